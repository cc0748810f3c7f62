"""Where a model's served label maps sit relative to the ground truth, to a fraction of a pixel.

Segments every image of a split through the model's inference contract (as
``segsvc eval`` and the server do), then counts, for each shift of the
predicted label map by -R..R whole pixels along one axis, how many labelled
pixels it agrees with the ground truth on. A parabola through the best shift and
its neighbours gives the sub-pixel offset per axis. A model trained on masks
that sat off their images (OpenCV's corner-aligned ``INTER_NEAREST`` resize, see
``segsvc.data.transforms.resize_labels``) predicts labels offset the same way.
Not part of the test suite.

    python bench/prediction_offset.py --model runs/s36/repo/fcn8s-labels --data camvid [--split val] [--radius 2]

Prints the offset (dy, dx) in full-resolution pixels: positive means the
predictions sit below / right of the labels.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from segsvc.data.datasets import build_dataset  # noqa: E402
from segsvc.data.registration import parabola_peak  # noqa: E402
from segsvc.data.spec import load_dataset_spec  # noqa: E402
from segsvc.inference.predictor import Predictor  # noqa: E402
from segsvc.models.artifact import load_artifact  # noqa: E402


def agreement_by_shift(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray, radius: int, axis: int) -> np.ndarray:
    """Labelled pixels where ``pred`` moved by ``s`` px along ``axis`` equals ``truth``, for s = -radius..radius."""
    n = truth.shape[axis]
    inner = [slice(None), slice(None)]
    inner[axis] = slice(radius, n - radius)
    counts = []
    for s in range(-radius, radius + 1):
        moved = [slice(None), slice(None)]
        moved[axis] = slice(radius - s, n - radius - s)  # content moves by +s
        counts.append(int(((pred[tuple(moved)] == truth[tuple(inner)]) & valid[tuple(inner)]).sum()))
    return np.array(counts, np.float64)


def offset(counts: np.ndarray, radius: int) -> float:
    """The shift that best aligns the predictions, negated: where they sit relative to the labels."""
    best = int(counts.argmax())
    if best in (0, len(counts) - 1):
        return float("nan")  # the peak lies at the edge of the search: beyond the radius
    return -(best - radius + parabola_peak(counts[best - 1 : best + 2]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="<repo>/<name>[/<version>] (the latest version by default)")
    parser.add_argument("--data", required=True, help="dataset spec (camvid, membrane, or a YAML)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--radius", type=int, default=2, help="largest whole-pixel shift tried (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = Path(args.model)
    if not (folder / "manifest.json").is_file():
        folder = folder / str(max(int(p.name) for p in folder.iterdir() if p.name.isdigit()))
    model, manifest = load_artifact(folder, device="cpu")
    predictor = Predictor(model, manifest, "cpu")
    spec = load_dataset_spec(args.data)
    dataset = build_dataset(spec, args.split)
    totals = np.zeros((2, 2 * args.radius + 1))
    for i in range(len(dataset)):
        image, mask = dataset.read(i)
        truth = np.asarray(mask)
        valid = truth != spec.ignore_index if spec.ignore_index is not None else np.ones(truth.shape, bool)
        pred = predictor.predict(image)
        for axis in (0, 1):
            totals[axis] += agreement_by_shift(pred, truth, valid, args.radius, axis)
    dy, dx = offset(totals[0], args.radius), offset(totals[1], args.radius)
    print(f"{folder} on {spec.name}/{args.split}, {len(dataset)} images")
    for name, row in (("rows (dy)", totals[0]), ("columns (dx)", totals[1])):
        base = row[args.radius]
        print(f"  agreement by shift of the {name}, relative to no shift: "
              + "  ".join(f"{s:+d}: {v / base:.5f}" for s, v in zip(range(-args.radius, args.radius + 1), row)))
    print(f"offset of the predictions from the labels: dy {dy:+.3f} px, dx {dx:+.3f} px (full resolution)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
