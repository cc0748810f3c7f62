"""Exports of model versions for other runtimes: ``segsvc export MODEL[:V] --format onnx|triton``.

- ``segsvc.export.onnx``: ``<repo>/<model>/<version>/model.onnx`` beside the weights
  (a re-export: ``model-<sha>.onnx``, the recorded file is never overwritten),
  with dynamic batch, height and width, validated against eager PyTorch with ONNX
  Runtime and recorded in the manifest (``exports["onnx"]``, whose ``file`` every
  reader, the onnxruntime backend included, takes the name from). ``UNEXPORTABLE`` there names the architectures that
  cannot be exported, and why.
- ``segsvc.export.compare``: the check an export must pass (ONNX Runtime against
  eager PyTorch).
- ``segsvc.export.triton``: a Triton Inference Server model repository built from
  that export.

Depends on ``segsvc.models``, ``segsvc.config`` and ``segsvc.errors`` only. This
module holds only the defaults (no torch import), so the command line can show
them without loading the exporter.
"""

ONNX_FILE = "model.onnx"  # a first export's name (and Triton's); readers use the manifest's exports.onnx.file
INPUT_NAME = "input"  # float32 [batch, C, height, width], normalised and padded
OUTPUT_NAME = "logits"  # float32 [batch, K, height, width]
# torch.onnx's native opset in torch 2.14. ONNX Runtime runs opset 18 from 1.14 on, and the file says IR version 8
# (the lowest opset 18 allows; the exporter's own 10 is refused by ONNX Runtime <= 1.16, as in Triton 23.x), so
# ONNX Runtime >= 1.14 loads it (checked with 1.16.3), and Triton releases that bundle one of those.
DEFAULT_OPSET = 18
DEFAULT_CHECKS = 4  # validation inputs
# Max |logit difference| allowed, relative to max(1, max |logit|). fp32 rounding alone reaches ~1e-3 of
# the logit scale in deep or attention-heavy networks (smp MAnet: 1.4e-3, and there eager PyTorch in fp32
# is as far from its own fp64 result as ONNX Runtime is), so this only catches gross numerical errors;
# the label agreement is the main criterion.
DEFAULT_TOLERANCE = 1e-2
MIN_AGREEMENT = 0.999  # share of pixels whose label (argmax over classes) must agree
DEFAULT_MAX_BATCH_SIZE = 8  # Triton's max_batch_size
