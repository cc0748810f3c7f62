"""``segsvc jobs``: batch segmentation and training jobs on a running server, from the command line.

``submit`` starts a job over server paths (under the server's ``--data-root``)
or, with ``--upload``, over local files; ``list``, ``status``, ``wait``,
``cancel``, ``delete`` and ``fetch`` act on jobs by id, training jobs
(``segsvc train --server``) included. ``wait`` (and ``submit --wait``) shows a
tqdm bar fed by the operation's metadata on a terminal, and in a log a plain
line per milestone (``segsvc.progress.JobBar``). Only the light client is
imported (no torch).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from segsvc.cli_values import check_overlap_flags, tile_overlap, tile_size
from segsvc.errors import Cancelled, DeadlineExceeded, SegsvcError, Unavailable
from segsvc.progress import show_progress


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from segsvc.cli_client import open_client

    return open_client(args)


def _print_status(status) -> None:  # type: ignore[no-untyped-def]
    """One line per job; a job that ended in error says why on the next."""
    eta = f", eta {status.eta_s:.0f} s" if status.eta_s and not status.done_flag else ""
    if status.cancel_requested and not status.done_flag:  # `jobs cancel` returns before the job has stopped
        eta = ", cancel requested"
    if hasattr(status, "phase"):  # a training job
        miou = f", val mIoU {status.val_miou:.4f} (best {status.best_miou:.4f})" if status.val_miou else ""
        epochs = status.epochs or "?"  # a time budget's trainer announces its epochs once it has timed one
        progress = (f" epoch {status.epoch}/{epochs} step {status.step}/{status.steps_per_epoch}  "
                    f"loss {status.loss:.4f}{miou}" if status.started else "")  # none before its first step
        print(f"{status.name}  {status.state:9}  train {status.shown_phase:10}{progress}  "
              f"{status.recipe} on {status.dataset} -> {status.model}{eta}")
    else:
        print(f"{status.name}  {status.state:9}  {status.processed}/{status.total} "
              f"(done {status.done}, failed {status.failed}, skipped {status.skipped})  "
              f"{status.model}:{status.version}  {status.images_per_s:.1f} img/s{eta}")
    if status.error:
        print(f"  {status.state.lower()}: {status.error}")
    if getattr(status, "paused_reason", "") and not status.done_flag:
        print(f"  paused: {status.paused_reason}")


def follow(job, args: argparse.Namespace) -> int | None:  # type: ignore[no-untyped-def]
    """``job.wait`` with the bar (``submit --wait``, ``wait``, ``train --wait``); None once the job is done.

    The job lives on the server: a Ctrl-C stops only the waiting (exit 130), and a server that stops
    keeps the job and resumes it when it starts again. Both say so, with the command that follows the
    job again, so that no one submits it a second time.
    """
    again = f"segsvc jobs wait {job.id} --server {args.server}"
    try:
        job.wait(progress=args.progress)
    except KeyboardInterrupt:
        print(f"segsvc: stopped waiting; job {job.id} goes on on the server: `{again}` follows it again, "
              f"`segsvc jobs cancel {job.id} --server {args.server}` stops it", file=sys.stderr)
        return 130
    except (Unavailable, Cancelled, DeadlineExceeded):
        # nothing listens any more, a stopping server cancelled the call, or a hung server (or a network that
        # dropped without a reset) let the call's deadline pass
        raise Unavailable(f"lost the server at {args.server} while waiting for job {job.id}; the server keeps the "
                          f"job and resumes it when it starts again: `{again}` follows it then (submitting it "
                          "again would start a second job)") from None
    return None


SHOWN_FAILURES = 20  # printed by jobs wait/status; the job's failures file lists every one
TIMEOUT_S = 60.0  # --timeout-s by default: each call's deadline, and how long a fetch waits for the server to send


def _print_result(job) -> int:  # type: ignore[no-untyped-def]
    from segsvc.jobclient import TrainingJobHandle

    if isinstance(job, TrainingJobHandle):
        from segsvc.cli_train import print_training_result

        print_training_result(job)
        return 0
    result = job.result()
    print(json.dumps({
        "job": job.name, "output_location": result.output_location, "done": result.done, "failed": result.failed,
        "skipped": result.skipped, "images_per_s": round(result.images_per_s, 2),
        "class_pixel_totals": result.class_pixel_totals,
        "failures": [{"input": i, "reason": r} for i, r in result.failures[:SHOWN_FAILURES]],
        **({"failures_not_shown": result.failed - min(len(result.failures), SHOWN_FAILURES)}
           if result.failed > min(len(result.failures), SHOWN_FAILURES) else {}),
        **({"failures_file": f"{result.output_location}/{result.failures_file}"} if result.failures_file else {}),
    }, indent=2))
    return 1 if result.failed else 0


def add_jobs_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``segsvc jobs ...``."""
    from segsvc.cli_client import connection_flags

    common = connection_flags("deadline of each call; for fetch, the longest the server may send nothing", TIMEOUT_S)

    p = sub.add_parser("jobs", help="batch segmentation and training jobs on a server: submit, list, status, wait, "
                                    "cancel, ...")
    jsub = p.add_subparsers(dest="jobs_cmd", required=True)

    def handler(fn, check=None):  # type: ignore[no-untyped-def]
        def run(args: argparse.Namespace) -> int:
            if check is not None:  # before connecting: a typo fails at once, whether a server runs or not
                check(args)
            with _client(args) as client:
                return fn(client, args)
        return run

    ps = jsub.add_parser("submit", parents=[common], help="start a job; prints its id (or waits with --wait)")
    ps.add_argument("inputs", nargs="+", metavar="DIR_OR_FILES",
                    help="paths under the server's --data-root (folders, globs, files), or local ones with --upload")
    ps.add_argument("--upload", action="store_true", help="upload local files (one folder keeps relative paths)")
    ps.add_argument("--model", default=None, help="NAME or NAME:VERSION (default: the server's only model)")
    ps.add_argument("--request-id", default="", help="idempotency key: resubmitting returns the same job")
    ps.add_argument("--overlay", action="store_true", help="also write overlays")
    ps.add_argument("--color", action="store_true", help="also write colour masks")
    ps.add_argument("--confidence", action="store_true", help="also write confidence PNGs")
    ps.add_argument("--tile-size", type=tile_size, default=None,
                    help="sliding-window tile side; 0: off (default: the model's, usually off)")
    ps.add_argument("--overlap", type=tile_overlap, default=None,
                    help="sliding-window overlap, a fraction of the tile; needs --tile-size (default: the model's, "
                         "0.25 unless its manifest says)")
    ps.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=None,
                    help="horizontal-flip test-time augmentation (default: the model's, usually off)")
    ps.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    ps.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ps.set_defaults(func=handler(_submit, _check_submit))

    pl = jsub.add_parser("list", parents=[common], help="list jobs, oldest first")
    pl.add_argument("--filter", default="", help="e.g. 'state=RUNNING' or 'done=false'")
    pl.set_defaults(func=handler(_list))

    for name, fn, text in (("status", _status, "show a job's progress"),
                           ("wait", _wait, "follow a job with a progress bar until it ends; print its result"),
                           ("cancel", _cancel, "stop a job within one batch (finished outputs are kept)")):
        pc = jsub.add_parser(name, parents=[common], help=text)
        pc.add_argument("job", help="job id or jobs/<id>")
        if name == "wait":
            pc.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        pc.set_defaults(func=handler(fn))

    pd = jsub.add_parser("delete", parents=[common], help="forget a finished job")
    pd.add_argument("job", help="job id or jobs/<id>")
    pd.add_argument("--outputs", action="store_true", help="also delete its output folder on the server")
    pd.set_defaults(func=handler(_delete))

    pf = jsub.add_parser("fetch", parents=[common], help="download a job's outputs (a training job's artifacts)")
    pf.add_argument("job", help="job id or jobs/<id>")
    pf.add_argument("--out", required=True, help="local folder for the files")
    pf.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    pf.set_defaults(func=handler(_fetch, _check_fetch))


def _check_submit(args: argparse.Namespace) -> None:
    """What ``jobs submit`` can refuse before connecting: --overlap without --tile-size, local files with --upload."""
    check_overlap_flags(args.tile_size, args.overlap)
    if args.upload:
        from segsvc.jobclient import local_images

        local_images(args.inputs)


def _check_fetch(args: argparse.Namespace) -> None:
    """``jobs fetch``'s --out is a folder it can write, checked before connecting."""
    from segsvc.jobclient import check_fetch_folder

    check_fetch_folder(args.out, f"--out {args.out}")


def _submit(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from segsvc.model_names import parse_model_ref

    model, version = parse_model_ref(args.model) if args.model else (None, None)
    job = client.submit_job(
        () if args.upload else args.inputs, upload=args.inputs if args.upload else None, model=model,
        version=version, request_id=args.request_id, overlay=args.overlay, color=args.color,
        confidence=args.confidence, tile_size=args.tile_size, tile_overlap=args.overlap, flip_tta=args.flip_tta,
    )
    print(job.id, flush=True)
    if not args.wait:
        return 0
    stopped = follow(job, args)
    return stopped if stopped is not None else _print_result(job)


def _list(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    count = 0
    for status in client.list_jobs(filter=args.filter):
        _print_status(status)
        count += 1
    if not count:
        print("no jobs")
    return 0


def _status(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    job = client.job(args.job)
    job.wait(progress=show_progress(True), timeout_s=0)  # one frame of the bar on a terminal; a log has the line
    _print_status(job.status(refresh=False))
    return 0


def _wait(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    job = client.job(args.job)
    stopped = follow(job, args)
    return stopped if stopped is not None else _print_result(job)


def _cancel(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    job = client.job(args.job)
    job.cancel()
    _print_status(job.status(refresh=False))
    return 0


def _delete(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    removed = client.job(args.job).delete(outputs=args.outputs)
    print(f"deleted {args.job}" + (f" and {removed} output files" if args.outputs else ""))
    return 0


def _not_done(job):  # type: ignore[no-untyped-def]
    """The status of a training job that has not ended, as ``client.job`` read it; None once it ended, and for a
    batch job (the server refuses to fetch one before it ends: a fetch that succeeds got all of its files)."""
    from segsvc.jobclient import TrainingJobHandle

    if not isinstance(job, TrainingJobHandle):
        return None
    status = job.status(refresh=False)
    return None if status.done_flag else status


def _fetch_again(job_id: str, args: argparse.Namespace) -> str:
    """The command line of this fetch, connection flags included, for the user to run again."""
    flags = [f"--server {shlex.quote(args.server)}", f"--out {shlex.quote(str(args.out))}"]
    flags += ["--tls"] if args.tls else []
    flags += [f"--{name.replace('_', '-')} {shlex.quote(value)}"
              for name in ("tls_ca", "token_file") if (value := getattr(args, name))]
    timeout_s = getattr(args, "timeout_s", TIMEOUT_S)
    flags += [f"--timeout-s {timeout_s:g}"] if timeout_s != TIMEOUT_S else []
    return f"segsvc jobs fetch {job_id} {' '.join(flags)}"


def _fetch(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from segsvc.downloads import StreamLost

    job = client.job(args.job)
    running = _not_done(job)  # as the fetch begins: a training job still running has written only some files
    try:
        files = job.fetch(args.out, progress=args.progress)
    except StreamLost as lost:  # the server died ("Stream removed (Socket closed)") or a stopping one cancelled it
        # ``written`` counts this fetch's files only, and a new fetch downloads every file again (replacing them)
        written = lost.written
        raise Unavailable(f"lost the server at {args.server} while fetching job {job.id}; {written} "
                          f"{'file' if written == 1 else 'files'} written into {args.out} before it went: run "
                          f"`{_fetch_again(job.id, args)}` again when it is back (it fetches every file "
                          "again)") from None
    if not files:
        raise SegsvcError(f"job {args.job} has no output files" + (" yet" if running else ""))
    print(f"fetched {len(files)} files into {args.out}")
    if running:
        print(f"segsvc: job {job.id} was {running.state} when the fetch began: these are the files it had written "
              "by then; fetch again once it ends for all of them", file=sys.stderr)
    return 0
