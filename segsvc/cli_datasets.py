"""``segsvc datasets``: datasets on a running server, from the command line; and ``serve``'s dataset flags.

``upload`` sends a local folder (packed as a tar stream on the fly, or file by
file with ``--pairs``) or a tar/zip archive, with a progress bar; ``register``
names a folder under the server's ``--data-root``; ``list``, ``show`` and
``delete`` act on datasets by name or content hash. A dataset that fails its
check prints every problem the server listed. Only the light client is
imported (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timezone
from pathlib import Path

from segsvc.cli_values import mebibytes, number, positive_float, positive_int

MIB = 1 << 20


# -- serve: the registry's flags (datasets are on with --state-dir) ---------------------------
def add_server_arguments(group: argparse._ArgumentGroup) -> None:
    """``--max-dataset-mb``, ``--max-dataset-files``, ``--max-dataset-ratio``, ``--max-dataset-pixels``,
    ``--max-dataset-uploads``, ``--dataset-upload-idle-s`` and ``--max-datasets-disk-mb`` in ``segsvc serve``."""
    group.add_argument("--max-dataset-mb", type=mebibytes, default=2048,
                       help="largest uploaded dataset in MiB, as sent and as extracted (default 2048)")
    group.add_argument("--max-dataset-files", type=positive_int, default=100_000,
                       help="most files in an uploaded or registered dataset (default 100000)")
    group.add_argument("--max-dataset-ratio", type=number(0.0, strict=True), default=100.0,
                       help="most bytes extracted per compressed byte of an uploaded archive (default 100)")
    group.add_argument("--max-dataset-pixels", type=positive_int, default=64_000_000,
                       help="largest image or mask (height x width) of an uploaded or registered dataset, read "
                            "from its header before it is decoded (default 64000000)")
    group.add_argument("--max-dataset-uploads", type=positive_int, default=4,
                       help="dataset uploads received at the same time; one more is refused (default 4)")
    group.add_argument("--dataset-upload-idle-s", type=positive_float, default=300.0,
                       help="longest wait for the next chunk of a dataset upload before it is dropped with its "
                            "files (default 300)")
    group.add_argument("--max-datasets-disk-mb", type=mebibytes, default=65536,
                       help="most MiB the state folder's datasets may take: uploaded datasets plus the uploads in "
                            "progress, checked before each byte is written (default 65536)")


def server_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The registry's configuration: on when ``--state-dir`` is given (registering also needs ``--data-root``)."""
    if args.state_dir is None:
        return None
    from segsvc.datasets.archive import ExtractLimits
    from segsvc.datasets.registry import DatasetsConfig

    limits = ExtractLimits(max_bytes=int(args.max_dataset_mb * MIB), max_files=args.max_dataset_files,
                           max_ratio=args.max_dataset_ratio, max_pixels=args.max_dataset_pixels)
    return DatasetsConfig(state_dir=Path(args.state_dir), data_root=Path(args.data_root) if args.data_root else None,
                          limits=limits, max_concurrent_uploads=args.max_dataset_uploads,
                          upload_idle_s=args.dataset_upload_idle_s,
                          max_disk_bytes=int(args.max_datasets_disk_mb * MIB))


# -- segsvc datasets ... ---------------------------------------------------------------------
def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from segsvc.cli_client import open_client

    return open_client(args)


def add_datasets_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``segsvc datasets ...``."""
    from segsvc.cli_client import connection_flags

    common = connection_flags("deadline of list/show/delete; uploads and registrations have none",
                              token_help="bearer token file with the manage scope (else $SEGSVC_AUTH_TOKEN)")
    common.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("datasets", help="datasets on a server: upload, register, list, show, delete")
    dsub = p.add_subparsers(dest="datasets_cmd", required=True)

    def handler(fn):  # type: ignore[no-untyped-def]
        def run(args: argparse.Namespace) -> int:
            from segsvc.cli_client import read_text_arg
            from segsvc.errors import DatasetInvalid, InvalidArgument

            # local files are read before connecting: a missing one fails at once, not after the upload starts
            if fn is _upload and not Path(args.path).exists():  # (nor after waiting for a server that is not up)
                raise InvalidArgument(f"{args.path} does not exist")
            if fn is _upload and Path(args.path).is_dir():
                _check_names(Path(args.path))
            if fn is _upload and args.dataset_yaml and args.classes:
                raise InvalidArgument("give the classes with --dataset-yaml or --classes, not both")
            dataset_yaml = getattr(args, "dataset_yaml", None)
            args.dataset_yaml_text = read_text_arg(dataset_yaml, "--dataset-yaml") if dataset_yaml else ""
            with _client(args) as client:
                try:
                    return fn(client, args)
                except DatasetInvalid as exc:
                    _print_problems(exc)
                    raise
        return run

    pu = dsub.add_parser("upload", parents=[common], help="upload a local folder or a tar/zip archive")
    pu.add_argument("path", help="a dataset folder (images/ + masks/, dataset.yaml, ...) or .tar/.tar.gz/.zip")
    pu.add_argument("--name", required=True, help="the dataset's unique name on the server")
    pu.add_argument("--pairs", action="store_true", help="send a folder file by file instead of as a tar stream")
    pu.add_argument("--dataset-yaml", default=None, help="a dataset.yaml to send with a folder that has none")
    pu.add_argument("--classes", nargs="+", default=(), metavar="NAME",
                    help="class names of a folder without dataset.yaml (class id i = i-th name)")
    pu.add_argument("--sha256", default="", help="expected content hash: the server refuses other content")
    pu.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    pu.set_defaults(func=handler(_upload))

    pr = dsub.add_parser("register", parents=[common], help="register a folder under the server's --data-root")
    pr.add_argument("path", help="folder relative to the server's data root")
    pr.add_argument("--name", default="", help="the dataset's unique name (default: the folder's name)")
    pr.set_defaults(func=handler(_register))

    pl = dsub.add_parser("list", parents=[common], help="list the server's datasets, oldest first")
    pl.set_defaults(func=handler(_list))

    for name, fn, text in (("show", _show, "print a dataset's classes, splits, class shares and hash"),
                           ("delete", _delete, "forget a dataset (uploaded files go too; registered folders stay)")):
        pc = dsub.add_parser(name, parents=[common], help=text)
        pc.add_argument("dataset", help="name, content hash or a unique hash prefix (8+ hex digits)")
        pc.set_defaults(func=handler(fn))


def _as_dict(d) -> dict:  # type: ignore[no-untyped-def]
    from segsvc.client import DATASET_SOURCES

    return {
        "name": d.name, "sha256": d.sha256, "source": DATASET_SOURCES.get(d.source, "?"),
        "source_path": d.source_path, "format": d.format, "classes": list(d.class_names),
        "splits": {s.split: s.samples for s in d.splits}, "split_assigned": d.split_assigned,
        "class_shares": {c.class_name: round(c.share, 6) for c in d.class_shares},
        "files": d.files, "total_bytes": d.total_bytes,
        "created": d.create_time.ToDatetime(tzinfo=timezone.utc).isoformat(timespec="seconds"),
    }


def _print_dataset(d, args: argparse.Namespace, full: bool = True) -> None:  # type: ignore[no-untyped-def]
    info = _as_dict(d)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    splits = ", ".join(f"{s} {n}" for s, n in info["splits"].items())
    print(f"{info['name']}  {info['sha256'][:12]}  {info['source']}:{info['source_path']}  {info['format']}  "
          f"{len(info['classes'])} classes  {splits}  {info['files']} files  {info['total_bytes'] / MIB:.1f} MiB")
    if not full:
        return
    print(f"  sha256   {info['sha256']}")
    print(f"  created  {info['created']}")
    print(f"  splits   {splits}" + ("  (train/val assigned by hash)" if info["split_assigned"] else ""))
    print("  classes  (share of labelled pixels)")
    for i, (name, share) in enumerate(info["class_shares"].items()):
        print(f"    {i:3d} {name:24} {100 * share:6.2f}%")


def _print_problems(exc) -> None:  # type: ignore[no-untyped-def]
    if not exc.problems:
        return
    print(f"the dataset fails its check with {len(exc.problems)} problem(s):", file=sys.stderr)
    for kind, subject, description in exc.problems:
        print(f"  [{kind}] {subject}: {description}", file=sys.stderr)


def _check_names(folder: Path) -> None:
    """Refuse a folder holding a file name the server refuses, before anything is sent: the server sees the
    names only when it extracts the upload, after its last byte."""
    from segsvc.datasets.content import local_files
    from segsvc.jobs.staging import check_upload_name

    for rel, _ in local_files(folder):
        check_upload_name(rel)


def _upload(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    dataset = client.upload_dataset(args.path, args.name, format="pairs" if args.pairs else None,
                                    dataset_yaml=args.dataset_yaml_text, class_names=args.classes, sha256=args.sha256,
                                    progress=args.progress)
    _print_dataset(dataset, args)
    return 0


def _register(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    _print_dataset(client.register_dataset(args.path, args.name), args)
    return 0


def _list(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    datasets = client.list_datasets()
    if args.json:
        print(json.dumps([_as_dict(d) for d in datasets], indent=2))
    for d in datasets if not args.json else ():
        _print_dataset(d, args, full=False)
    if not datasets and not args.json:
        print("no datasets")
    return 0


def _show(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    _print_dataset(client.get_dataset(args.dataset), args)
    return 0


def _delete(client, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    dataset = client.delete_dataset(args.dataset)
    print(f"deleted dataset {dataset.name} ({dataset.sha256[:12]})")
    return 0
