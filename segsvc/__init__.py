"""segsvc: a semantic segmentation service.

Models from the classic literature (FCN, U-Net, SegNet) and every
segmentation-models-pytorch architecture behind one registry, offline training
on real datasets, and a gRPC inference server that returns per-pixel label maps.
"""

import os as _os

# albumentations checks PyPI for a newer release on import unless told not to;
# the service never reaches for the network at run time.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
