"""``segsvc train --server``: a training job on a running server, from the command line.

Without ``--server``, ``segsvc train --config RECIPE`` trains locally as
before (``training/train.py``), and refuses the server job's flags rather than
ignore them (``--epochs 1`` names ``--set train.epochs=1``); ``--no-progress``
means ``train.progress=false`` there. With it, the job runs on the server: the
dataset is one registered there (``segsvc datasets``), the recipe is one of the
server's (``--recipe NAME``) or a local file sent inline (``--config FILE``),
``--set`` overrides apply on top, ``--from MODEL[:VERSION]`` fine-tunes a
served model. ``--wait`` follows it with a tqdm bar (epoch, loss, validation
mIoU in the postfix; in a log, that text once per epoch) and prints the gate's
verdict and comparison table. Only the light client is imported (no torch).
``training_config`` builds the server's side (``segsvc serve --max-training-jobs``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from segsvc.cli_values import fraction, number, whole_number
from segsvc.errors import InvalidArgument

MAX_NPROC_PER_NODE = 64  # TrainingRequest's bound on nproc_per_node


def _budget_minutes(text: str) -> float:
    """``--budget-min``: minutes in ``(0, MAX_TIME_MIN]``, as ``TrainingRequest`` takes them; the bound is read
    only when the flag is given (its module is slow to import)."""
    from segsvc.jobs.trainspec import MAX_TIME_MIN

    return number(0.0, strict=True, most=MAX_TIME_MIN)(text)


def _epochs(text: str) -> int:
    """``--epochs``: ``1..MAX_EPOCHS``, as ``TrainingRequest`` takes them."""
    from segsvc.jobs.trainspec import MAX_EPOCHS

    return whole_number(1, MAX_EPOCHS)(text)


def add_server_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``segsvc train --server ...`` (``--config`` becomes optional: a server job may name a recipe)."""
    for action in parser._actions:
        if action.dest == "config":
            action.required = False
            action.help = (f"{action.help}; with --server: a local recipe file sent to the server "
                           "(or use --recipe NAME for one of the server's)")
    g = parser.add_argument_group("a training job on a server (with --server)")
    g.add_argument("--server", default=None, help="HOST:PORT of a segsvc server: train there as a job")
    g.add_argument("--dataset", default=None, help="a dataset registered on the server (name or SHA-256)")
    g.add_argument("--recipe", default="", help="a recipe of the server's training/recipes, e.g. synthetic-quick")
    g.add_argument("--from", dest="base_model", default="", metavar="MODEL[:VERSION]",
                   help="fine-tune a served model (default version unless given); classes may differ")
    g.add_argument("--model-name", default="", help="model to publish into (default: base model or recipe's)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--budget-min", type=_budget_minutes, default=None,
                        help="wall-clock budget in minutes (at most a week, 10080, or the server's --max-train-min)")
    budget.add_argument("--epochs", type=_epochs, default=None, help="train exactly this many epochs")
    g.add_argument("--device", default="auto", help="auto (the server's GPU when it has one), cpu or cuda")
    g.add_argument("--nproc-per-node", type=whole_number(1, MAX_NPROC_PER_NODE), default=1, help="processes (GPUs); >1 runs torchrun (default 1)")
    g.add_argument("--promote", default="gate", choices=("gate", "always", "never"),
                   help="make it the default: when it beats the current default (gate, default), always, never")
    g.add_argument("--gate-margin", type=fraction, default=0.0,
                   help="mIoU margin over the default, in [0, 1] (default 0)")
    g.add_argument("--request-id", default="", help="idempotency key: resubmitting returns the same job")
    g.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--token-file", default=None, help="bearer token file (else $SEGSVC_AUTH_TOKEN)")
    g.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    g.add_argument("--tls-ca", default=None, help="PEM CA bundle that signed the server's certificate")
    g.add_argument("--timeout-s", type=float, default=60.0, help="deadline of each call (default 60)")
    # which of them were given is told by their defaults: refuse_server_flags reads these
    parser.set_defaults(server_only_flags=tuple((a.dest, a.option_strings[-1], a.default) for a in g._group_actions
                                                if a.dest != "server"))


# the recipe key a --server flag sets on the server; locally it is given with --set
LOCAL_EQUIVALENTS = {"epochs": "train.epochs", "device": "train.device", "budget_min": "train.max_time_min",
                     "dataset": "data.spec"}


# the flags of the group that local training honours too, and the override each stands for
LOCAL_FLAGS = {"progress": "train.progress=false"}


def local_overrides(args: argparse.Namespace) -> list[str]:
    """``--no-progress`` without ``--server``: ``train.progress=false`` (the flag's meaning in both places)."""
    if getattr(args, "server", None):
        return []
    return [override for dest, override in LOCAL_FLAGS.items() if getattr(args, dest, True) is False]


def refuse_server_flags(args: argparse.Namespace) -> None:
    """Local training (no ``--server``) refuses the flags of a server job instead of ignoring them.

    ``segsvc train --config R --epochs 1`` trained the recipe's epochs, and ``--device cuda`` on the CPU;
    the message names the ``--set`` that does it locally.
    """
    if getattr(args, "server", None):
        return
    given = [(dest, option) for dest, option, default in getattr(args, "server_only_flags", ())
             if getattr(args, dest, default) != default and dest not in LOCAL_FLAGS]
    if not given:
        return
    dest, option = given[0]
    text = f"{option} is for a job on a server (--server)"
    if dest in LOCAL_EQUIVALENTS:
        value = getattr(args, dest)
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        text += f"; here use --set {LOCAL_EQUIVALENTS[dest]}={shown}"
    others = [option for _, option in given[1:]]
    if others:
        text += f" (as are {', '.join(others)})"
    raise InvalidArgument(text)


def submit_training(args: argparse.Namespace) -> int:
    from segsvc.cli_client import open_client, read_text_arg
    from segsvc.cli_jobs import follow

    if args.resume or args.profile:
        raise InvalidArgument("--resume and --profile are for local training; a server job resumes by itself")
    if not args.dataset:
        raise InvalidArgument("segsvc train --server needs --dataset NAME (a dataset registered on the server)")
    if args.config and args.recipe:
        raise InvalidArgument("give --recipe NAME (the server's) or --config FILE (sent inline), not both")
    recipe_yaml = read_text_arg(args.config, "--config") if args.config else ""
    with open_client(args) as client:
        job = client.submit_training_job(
            args.dataset, recipe=args.recipe, recipe_yaml=recipe_yaml, overrides=args.overrides,
            base_model=args.base_model, model_name=args.model_name, max_time_min=args.budget_min,
            epochs=args.epochs, device=args.device, nproc_per_node=args.nproc_per_node, promote=args.promote,
            gate_margin=args.gate_margin, request_id=args.request_id,
        )
        print(job.id, flush=True)
        if not args.wait:
            return 0
        stopped = follow(job, args)
        if stopped is not None:
            return stopped
        print_training_result(job)
    return 0


def print_training_result(job) -> None:  # type: ignore[no-untyped-def]
    """The gate's verdict and the comparison table of a finished training job."""
    result = job.result()
    default = f"v{result.previous_default}" if result.previous_default else "none"
    print(f"{job.name}: published {result.model}:{result.version} after {result.epochs} epochs "
          f"({result.train_seconds:.0f} s); previous default {default}")
    print(result.verdict)
    print(result.table())


def training_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """``segsvc serve``: training jobs are on with --state-dir unless --max-training-jobs is 0."""
    from segsvc.jobs.trainspec import TrainingConfig

    if args.state_dir is None or args.max_training_jobs == 0:
        return None
    minutes = getattr(args, "max_train_min", None)  # --max-train-min: segsvc serve's flag
    limit = {} if minutes is None else {"max_time_min": minutes}
    return TrainingConfig(state_dir=Path(args.state_dir), max_training_jobs=args.max_training_jobs, **limit)
