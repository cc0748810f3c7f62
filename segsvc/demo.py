"""`make demo`: the whole product end to end, in a few minutes on 2 CPU cores.

1. If ``out/demo/model_repository`` holds no model, train the quick synthetic
   model (``segsvc train --config training/recipes/synthetic-quick.yaml``) as a
   separate process.
2. Start ``segsvc serve`` on a free local port and wait for health SERVING.
3. Segment synthetic samples (and a few CamVid/membrane images when those data
   sets and a matching ``camvid*``/``membrane*`` model are present) through the
   real gRPC client: a stream for the batch, single calls with options.
4. Write masks, colour masks, overlays and ``summary.md``/``summary.json`` to
   ``out/demo/``, stop the server with SIGTERM (it drains and exits 0).
5. Print each architecture's output shape and forward time on a small image.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from segsvc.client import LabelMap, SegmentationClient
from segsvc.data.synthetic import SyntheticConfig, generate_sample
from segsvc.files import write_atomic
from segsvc.inference.codec import decode_image, encode_png
from segsvc.inference.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "out" / "demo"
REPO = OUT / "model_repository"
RECIPE = ROOT / "training" / "recipes" / "synthetic-quick.yaml"
DATASETS = Path(os.environ.get("SEGSVC_DATASETS", ROOT.parent / "shared" / "datasets"))
SYNTHETIC_SEED = 2  # the synthetic "test" split: never seen in training
REAL_SAMPLES = {  # model name prefix -> image files
    "camvid": lambda: sorted((DATASETS / "camvid" / "val").glob("*.png"))[:3],
    "membrane": lambda: sorted((DATASETS / "membrane" / "test").glob("*.png"), key=lambda p: int(p.stem))[:3],
}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}


def ensure_model() -> None:
    """Train the quick synthetic model into the demo repository unless it already has a model."""
    if ModelRepository(REPO).list_models():
        print(f"[1/5] model repository {REPO.relative_to(ROOT)} already has models: "
              f"{ModelRepository(REPO).list_models()}")
        return
    if not RECIPE.is_file():
        raise SystemExit(f"demo: {RECIPE} is missing and {REPO} has no model")
    print(f"[1/5] no model in {REPO.relative_to(ROOT)}: training {RECIPE.relative_to(ROOT)} (about 1-3 min)")
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "segsvc", "train", "--config", str(RECIPE),
         "--set", f"output.repo={REPO}", "--set", f"output.runs_dir={OUT / 'runs'}"],
        cwd=ROOT, env=_env(), check=True,
    )
    print(f"      trained in {time.perf_counter() - t0:.0f} s: {ModelRepository(REPO).list_models()}")


def start_server() -> tuple[subprocess.Popen, str, int]:
    """``segsvc serve`` on free local ports; returns the process, gRPC address and metrics port."""
    cmd = [sys.executable, "-m", "segsvc", "serve", "--model-repo", str(REPO), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--log-format", "text", "--log-level", "WARNING",
           "--grace-s", "10"]
    server = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()  # "segsvc: serving on 127.0.0.1:PORT, metrics on :PORT"
    if "serving on" not in line:
        server.kill()
        raise SystemExit(f"demo: the server did not start (said {line!r})")
    address = line.split("serving on ")[1].split(",")[0].strip()
    metrics_port = int(line.rsplit(":", 1)[1])
    return server, address, metrics_port


def stop_server(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        return server.wait()


def _iou_stats(pred: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, float]:
    """Pixel accuracy and mean IoU over the classes present in either map."""
    acc = float((pred == truth).mean())
    ious = []
    for c in range(k):
        union = np.logical_or(pred == c, truth == c).sum()
        if union:
            ious.append(np.logical_and(pred == c, truth == c).sum() / union)
    return acc, float(np.mean(ious)) if ious else 0.0


def _write(name: str, image: np.ndarray, result: LabelMap) -> dict:
    (OUT / "masks").mkdir(parents=True, exist_ok=True)
    (OUT / "overlays").mkdir(parents=True, exist_ok=True)
    write_atomic(OUT / "masks" / f"{name}.png", encode_png(result.mask))
    write_atomic(OUT / "masks" / f"{name}_color.png", encode_png(result.colorize()))
    write_atomic(OUT / "overlays" / f"{name}.png", encode_png(result.overlay(image)))
    present = sorted({result.class_names[c] for c in np.unique(result.mask) if c < len(result.class_names)})
    return {"name": name, "size": list(result.mask.shape), "model": f"{result.model}:{result.version}",
            "classes": present, "server_ms": round(result.timings.total_ms, 1),
            "batch_size": result.timings.batch_size}


def segment_samples(client: SegmentationClient, metrics_port: int) -> dict:
    models = {m.name: m for m in client.list_models()}
    synthetic = [n for n in models if not n.startswith(tuple(REAL_SAMPLES))] or list(models)
    model = synthetic[0]
    info = models[model]
    print(f"[3/5] segmenting through gRPC with model {model}:{info.default_version} "
          f"({info.arch}, {info.num_classes} classes, val mIoU {info.metrics.get('miou', float('nan')):.3f})")
    rows, scores = [], []
    # a batch over the stream: 96x96 test-split samples plus two larger images
    configs = [SyntheticConfig()] * 8 + [SyntheticConfig(size_hw=(192, 256))] * 2
    samples = [generate_sample(SYNTHETIC_SEED, i, cfg) for i, cfg in enumerate(configs)]
    (OUT / "inputs").mkdir(parents=True, exist_ok=True)
    for i, (image, _) in enumerate(samples):
        write_atomic(OUT / "inputs" / f"synthetic_{i:02d}.png", encode_png(image))
    t0 = time.perf_counter()
    results = client.segment_many([OUT / "inputs" / f"synthetic_{i:02d}.png" for i in range(len(samples))],
                                  model=model, progress=True)
    stream_s = time.perf_counter() - t0
    for i, ((image, truth), result) in enumerate(zip(samples, results)):
        row = _write(f"synthetic_{i:02d}", image, result)
        row["pixel_acc"], row["miou"] = (round(v, 4) for v in _iou_stats(result.mask, truth, info.num_classes))
        scores.append((row["pixel_acc"], row["miou"]))
        rows.append(row)
    # one unary call with every option: confidence, class counts, flip TTA, tiling
    image, truth = samples[-1]
    single = client.segment(image, model=model, confidence=True, class_counts=True, flip_tta=True,
                            tile_size=96, tile_overlap=0.25)
    write_atomic(OUT / "masks" / "synthetic_tta_tiled_confidence.png", encode_png(single.confidence))
    options_row = {"name": "synthetic_09 (flip TTA + 96 px tiles)", "class_counts": single.class_counts,
                   "mean_confidence": round(float(single.confidence.mean()) / 255, 3),
                   "pixel_acc": round(_iou_stats(single.mask, truth, info.num_classes)[0], 4),
                   "server_ms": round(single.timings.total_ms, 1)}
    # real images, when a data set and a matching model are both present
    for prefix, files in REAL_SAMPLES.items():
        matching = [n for n in models if n.startswith(prefix)]
        paths = files() if matching else []
        if not matching or not paths:
            continue
        for path, result in zip(paths, client.segment_many(paths, model=matching[0], progress=False)):
            rows.append(_write(f"{prefix}_{path.stem}", decode_image(path.read_bytes()), result))
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    served = sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
                 if line.startswith("segsvc_requests_total{") and 'code="OK"' in line)
    return {
        "model": f"{model}:{info.default_version}",
        "val_miou_at_training": info.metrics.get("miou"),
        "stream": {"images": len(samples), "seconds": round(stream_s, 2),
                   "mean_pixel_acc": round(float(np.mean([s[0] for s in scores])), 4),
                   "mean_miou": round(float(np.mean([s[1] for s in scores])), 4)},
        "options_call": options_row,
        "images": rows,
        "server_requests_ok": int(served),
    }


def architectures() -> list[str]:
    """Each architecture's output shape and forward time on a 96x128 image (untrained weights)."""
    import torch

    from segsvc.config import InputSpec
    from segsvc.inference.predictor import Predictor
    from segsvc.models import build_model
    from segsvc.models.artifact import Manifest
    from segsvc.models.zoo import paper_specs
    from segsvc.palette import default_palette

    torch.manual_seed(0)
    image = generate_sample(SYNTHETIC_SEED, 0, SyntheticConfig(size_hw=(96, 128)))[0]
    lines = []
    for label, spec in paper_specs().items():
        model = build_model(spec)
        manifest = Manifest(name="demo", version=1, spec=spec, input=InputSpec.default_for(3),
                            class_names=tuple(f"class_{i}" for i in range(spec.num_classes)),
                            palette=tuple(default_palette(spec.num_classes)))
        predictor = Predictor(model, manifest)
        t0 = time.perf_counter()
        labels = predictor.predict(image)
        dt = time.perf_counter() - t0
        params = sum(p.numel() for p in model.parameters()) / 1e6
        lines.append(f"{label:20} {params:7.2f} M params  {image.shape[:2]} -> {labels.shape}  {dt * 1e3:7.0f} ms")
        print("      " + lines[-1])
    return lines


def write_summary(summary: dict) -> None:
    write_atomic(OUT / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    s = summary["stream"]
    lines = [
        "# segsvc demo", "",
        f"Model `{summary['model']}` served by `segsvc serve` on {summary['address']}, "
        f"called through `SegmentationClient` over gRPC.", "",
        f"- stream: {s['images']} images in {s['seconds']} s; against the generator's exact labels: "
        f"mean pixel accuracy {s['mean_pixel_acc']}, mean IoU {s['mean_miou']}",
        f"- one call with flip TTA, tiling, confidence and class counts: {summary['options_call']}",
        f"- server answered {summary['server_requests_ok']} requests OK (Prometheus counter); "
        f"stopped with SIGTERM, exit code {summary['server_exit_code']}",
        f"- total demo time {summary['demo_seconds']} s", "",
        "| image | size | model | classes | pixel acc | mIoU | server ms | batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["images"]:
        lines.append(f"| {r['name']} | {r['size'][0]}x{r['size'][1]} | {r['model']} | {', '.join(r['classes'])} | "
                     f"{r.get('pixel_acc', '-')} | {r.get('miou', '-')} | {r['server_ms']} | {r['batch_size']} |")
    lines += ["", "Masks: `masks/` (class ids and `_color`), overlays: `overlays/`, inputs: `inputs/`.", "",
              "## Architectures (untrained, 96x128 input)", "", "```", *summary["architectures"], "```", ""]
    write_atomic(OUT / "summary.md", "\n".join(lines).encode())


def main() -> None:
    t_start = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    ensure_model()
    print("[2/5] starting segsvc serve")
    server, address, metrics_port = start_server()
    try:
        with SegmentationClient(address, timeout_s=120) as client:
            client.wait_until_serving(timeout_s=120)
            print(f"      SERVING on {address} (metrics on :{metrics_port})")
            summary = segment_samples(client, metrics_port)
    finally:
        print("[4/5] stopping the server with SIGTERM")
        code = stop_server(server)
    summary.update(address=address, server_exit_code=code)
    print("[5/5] architectures: output shape and forward time")
    summary["architectures"] = architectures()
    summary["demo_seconds"] = round(time.perf_counter() - t_start, 1)
    write_summary(summary)
    s = summary["stream"]
    print(f"\ndemo done in {summary['demo_seconds']} s: {len(summary['images'])} images segmented through gRPC "
          f"(synthetic mean pixel accuracy {s['mean_pixel_acc']}, mIoU {s['mean_miou']}); "
          f"server exit code {code}")
    print(f"outputs: {OUT.relative_to(ROOT)}/summary.md, masks/, overlays/")
    if code != 0:
        raise SystemExit(f"demo: the server exited with code {code} after SIGTERM")


if __name__ == "__main__":
    main()
