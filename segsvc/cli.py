"""The ``segsvc`` command line.

Each command group has one ``_add_<group>`` function that defines its
arguments and points ``func`` at a handler; handlers import their modules
lazily so ``segsvc --help`` stays fast. ``segsvc train`` is the only entry that
reaches into the ``training`` package; the service itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from segsvc.errors import SegsvcError


# -- models --------------------------------------------------------------------
def _models_list(args: argparse.Namespace) -> int:
    from segsvc.inference.repository import ModelRepository
    from segsvc.models.registry import available_models

    if args.repo is None:
        print("Registered architectures:")
        for name in available_models():
            print(f"  {name}")
        return 0
    repo = ModelRepository(args.repo)
    rows = repo.list_models()
    if not rows:
        print(f"no models in {args.repo}")
        return 0
    print(f"{'MODEL':24} {'VERSIONS':16} {'ARCH':20} {'CLASSES':>7}  mIoU")
    for name, versions in rows.items():
        latest = repo.read_manifest(name, versions[-1])
        miou = latest.metrics.get("miou")
        miou_s = f"{miou:.4f}" if isinstance(miou, (int, float)) else "-"
        vs = ",".join(str(v) for v in versions)
        print(f"{name:24} {vs:16} {latest.spec.arch:20} {latest.spec.num_classes:>7}  {miou_s}")
    return 0


def _models_show(args: argparse.Namespace) -> int:
    from segsvc.inference.repository import ModelRepository, parse_model_ref

    name, version = parse_model_ref(args.ref)
    repo = ModelRepository(args.repo)
    version = repo.resolve_version(name, version)
    manifest = repo.read_manifest(name, version)
    print(json.dumps(manifest.to_dict(), indent=2))
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list architectures or the models in a repository")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    pl = msub.add_parser("list", help="list registered architectures, or a repository's models with --repo")
    pl.add_argument("--repo", default=None, help="model repository root (<root>/<model>/<version>/)")
    pl.set_defaults(func=_models_list)
    ps = msub.add_parser("show", help="print a model version's manifest")
    ps.add_argument("ref", help="NAME or NAME:VERSION (default: the latest version)")
    ps.add_argument("--repo", required=True, help="model repository root")
    ps.set_defaults(func=_models_show)


_ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segsvc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SegsvcError as exc:
        print(f"segsvc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("segsvc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
