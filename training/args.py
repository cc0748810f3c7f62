"""The flags of ``segsvc train`` and ``python -m training``, defined once.

Kept free of torch imports so ``segsvc --help`` stays fast.
"""

from __future__ import annotations

import argparse


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. training/recipes/camvid-unet.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe value by its dotted key (repeatable), e.g. --set train.epochs=3",
    )
    parser.add_argument("--profile", default=None, help="apply a named profile of the recipe first, e.g. gpu")
    parser.add_argument("--resume", default=None, help="a run directory (or <run>/checkpoints/<name>.pt) to continue exactly")
    return parser
