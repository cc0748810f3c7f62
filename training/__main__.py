"""``python -m training --config RECIPE`` (also under ``torchrun --nproc_per_node=N -m training``)."""

import sys

from training.train import cli

sys.exit(cli())
