"""Segment round trips against a real server: label maps equal the in-process prediction."""

from __future__ import annotations

import asyncio
import threading

import cv2
import numpy as np
import pytest

from segsvc.inference.codec import decode_image, overlay
from segsvc.inference.tiling import make_logits_fn
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from tests.server.conftest import assert_labels_match, encode, make_image, reference

import grpc


def test_png_round_trip_equals_in_process_prediction(client, tiny_ref):
    image = make_image(61, 83, seed=1)
    result = client.segment(encode(image, ".png"), model="tiny")
    assert result.mask.dtype == np.uint8 and result.mask.shape == (61, 83)
    assert_labels_match(result.mask, tiny_ref, image)
    assert len(np.unique(result.mask)) > 1  # a meaningful comparison, not all one class
    assert result.model == "tiny" and result.version == 2
    assert result.class_names == ("c0", "c1", "c2")
    assert result.palette.shape == (3, 3)
    t = result.timings
    assert t.total_ms >= t.inference_ms > 0 and t.queue_ms >= 0 and t.batch_size >= 1


def test_jpeg_round_trip_equals_prediction_on_the_decoded_jpeg(client, tiny_ref):
    data = encode(make_image(64, 96, seed=2), ".jpg")
    decoded = decode_image(data)  # the server decodes with the same OpenCV
    result = client.segment(data, model="tiny")
    assert_labels_match(result.mask, tiny_ref, decoded)


@pytest.mark.parametrize("ext", [".tif", ".bmp", ".webp"])
def test_other_formats_decode(client, tiny_ref, ext):
    image = make_image(40, 56, seed=3)
    data = encode(image, ext)
    result = client.segment(data, model="tiny")
    assert_labels_match(result.mask, tiny_ref, decode_image(data))


def test_raw_rgb_and_grey_tensors(client, tiny_ref):
    rgb = make_image(50, 70, seed=4)
    assert_labels_match(client.segment(rgb, model="tiny").mask, tiny_ref, rgb)
    grey = make_image(50, 70, seed=5, channels=1)  # HxW to an RGB model: repeated to 3 channels
    assert_labels_match(client.segment(grey, model="tiny").mask, tiny_ref, grey)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])  # alpha is dropped
    assert_labels_match(client.segment(rgba, model="tiny").mask, tiny_ref, rgb)


def test_grey_model_accepts_rgb_png(client, shared_repo):
    ref = reference(shared_repo / "grey" / "1")
    image = make_image(48, 48, seed=6)
    result = client.segment(encode(image), model="grey")
    assert_labels_match(result.mask, ref, image)
    assert result.class_names == ("c0", "c1")


def test_png_label_map_encoding(client, tiny_ref):
    image = make_image(45, 33, seed=7)
    result = client.segment(image, model="tiny", encoding="png")
    assert_labels_match(result.mask, tiny_ref, image)


def test_more_than_256_classes_come_back_as_uint16(client, shared_repo):
    ref = reference(shared_repo / "wide" / "1")
    image = make_image(32, 40, seed=8)
    raw = client.segment(image, model="wide")
    assert raw.mask.dtype == np.uint16
    assert_labels_match(raw.mask, ref, image)
    png = client.segment(image, model="wide", encoding="png")  # 16-bit PNG
    assert png.mask.dtype == np.uint16 and np.array_equal(png.mask, raw.mask)


def test_overlay_png_is_the_palette_blended_over_the_image(shared_server, tiny_ref):
    image = make_image(30, 50, seed=9)
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        request = pb.SegmentRequest(model="tiny", image=encode(image),
                                    options=pb.SegmentOptions(encoding=pb.OUTPUT_ENCODING_OVERLAY_PNG,
                                                              overlay_alpha=0.4))
        response = stub.Segment(request, timeout=120)  # a deadline only a hang reaches
    assert response.labels.encoding == pb.OUTPUT_ENCODING_OVERLAY_PNG
    got = decode_image(response.labels.data)
    expected = overlay(image, tiny_ref.predict(image), tiny_ref.manifest.palette, 0.4)
    assert got.shape == (30, 50, 3) and np.array_equal(got, expected)


def test_raw_uint16_encoding_on_request(shared_server, tiny_ref):
    image = make_image(20, 24, seed=10)
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        response = stub.Segment(pb.SegmentRequest(
            model="tiny", image=encode(image),
            options=pb.SegmentOptions(encoding=pb.OUTPUT_ENCODING_RAW_UINT16)), timeout=120)
    labels = np.frombuffer(response.labels.data, "<u2").reshape(20, 24)
    assert_labels_match(labels, tiny_ref, image)


def test_confidence_and_class_counts(client, tiny_ref):
    import torch

    image = make_image(37, 41, seed=11)
    result = client.segment(image, model="tiny", confidence=True, class_counts=True)
    counts = np.bincount(result.mask.ravel(), minlength=3)
    assert result.class_counts == {"c0": counts[0], "c1": counts[1], "c2": counts[2]}
    assert sum(result.class_counts.values()) == 37 * 41
    with torch.inference_mode():
        p = torch.softmax(tiny_ref.logits(tiny_ref.input_tensor(image)[None]), 1).amax(1)[0]
    expected = torch.round(p * 255).to(torch.uint8).numpy()
    assert result.confidence.shape == (37, 41)
    assert np.abs(result.confidence.astype(int) - expected).max() <= 1
    assert result.confidence.min() >= 255 // 3  # a max over 3 classes is at least 1/3


def test_tiling_and_flip_tta_equal_the_shared_tiling_helpers(client, tiny_ref):
    image = make_image(70, 90, seed=12)
    tiled = client.segment(image, model="tiny", tile_size=32, tile_overlap=0.5)
    fn = make_logits_fn(tiny_ref.logits, tile=(32, 32), overlap=0.5)
    assert_labels_match(tiled.mask, tiny_ref, image, fn)
    flipped = client.segment(image, model="tiny", flip_tta=True)
    assert_labels_match(flipped.mask, tiny_ref, image, make_logits_fn(tiny_ref.logits, hflip=True))
    both = client.segment(image, model="tiny", flip_tta=True, tile_size=48)
    fn = make_logits_fn(tiny_ref.logits, tile=(48, 48), overlap=0.25, hflip=True)
    assert_labels_match(both.mask, tiny_ref, image, fn)


def test_request_id_is_echoed(client):
    result = client.segment(make_image(16, 16), model="tiny", request_id="my-id-42")
    assert result.request_id == "my-id-42"


def test_explicit_version_and_single_model_default(start_server, tmp_path):
    from tests.server.conftest import publish

    v1 = publish(tmp_path, "solo", seed=21)
    server = start_server(tmp_path)
    image = make_image(32, 32, seed=13)
    with server.client() as c:
        # the request names no model: the only loaded model serves it
        result = c.segment(image)
        assert result.model == "solo" and result.version == 1
        assert_labels_match(result.mask, reference(v1), image)
        assert c.segment(image, model="solo", version=1).version == 1


def test_concurrent_clients_with_different_sizes_get_their_own_results(shared_server, shared_repo):
    tiny = reference(shared_repo / "tiny" / "2")
    grey = reference(shared_repo / "grey" / "1")
    # sizes that share a padded size (stride 4) and sizes that do not, two models
    sizes = [(60, 80), (61, 79), (62, 78), (64, 64), (33, 95), (60, 80), (17, 23), (100, 40)]
    jobs = [(f"c{i}-{k}", "tiny" if (i + k) % 3 else "grey", make_image(*sizes[(i + k) % len(sizes)], seed=100 * i + k))
            for i in range(6) for k in range(4)]
    failures: list[str] = []
    results: dict[str, np.ndarray] = {}
    batch_sizes: list[int] = []
    batchers = [shared_server.manager.resolve(name, None).batcher for name in ("tiny", "grey")]
    batches_before = sum(b.stats.batches for b in batchers)
    items_before = sum(b.stats.items for b in batchers)

    def worker(mine):
        with shared_server.client(timeout_s=60) as c:
            for rid, model, image in mine:
                try:
                    r = c.segment(encode(image), model=model, request_id=rid)
                    assert r.request_id == rid
                    results[rid] = r.mask
                    batch_sizes.append(r.timings.batch_size)
                except Exception as exc:  # collected, asserted below
                    failures.append(f"{rid}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(jobs[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert len(results) == len(jobs)
    for rid, model, image in jobs:
        assert_labels_match(results[rid], tiny if model == "tiny" else grey, image)
    # Every batch of n items answered n requests that each report batch_size n, so the reported
    # sizes must add up to the batches the two batchers ran (one item per request, none dropped).
    assert sum(b.stats.items for b in batchers) - items_before == len(jobs)
    assert all(1 <= size <= 8 and batch_sizes.count(size) % size == 0 for size in batch_sizes), sorted(batch_sizes)
    assert sum(1 / size for size in batch_sizes) == pytest.approx(
        sum(b.stats.batches for b in batchers) - batches_before)


def test_model_info_rpcs(client):
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"tiny", "grey", "wide"}
    tiny = client.get_model("tiny")
    assert tiny.versions == [1, 2] and tiny.loaded_versions == [2] and tiny.default_version == 2
    assert tiny.ready and tiny.arch == "unet" and tiny.num_classes == 3 and tiny.output_stride == 4
    assert list(tiny.class_names) == ["c0", "c1", "c2"] and len(tiny.palette) == 3
    assert tiny.input.channels == 3 and len(tiny.input.mean) == 3 and tiny.device == "cpu"
    v1 = client.get_model("tiny", 1)  # on disk, not loaded
    assert v1.version == 1 and not v1.ready


def test_cli_segment_renames_each_output_into_place(shared_server, tmp_path, renames):
    """A mask that a killed client left half-written must not sit under its final name: each output file is
    written under a temporary name in its folder and renamed into place."""
    from segsvc.cli import main

    images = tmp_path / "in"
    images.mkdir()
    for i in range(2):
        (images / f"img{i}.png").write_bytes(encode(make_image(32, 40, seed=300 + i)))
    out = tmp_path / "out"
    assert main(["segment", str(images), "--server", shared_server.address, "--out", str(out),
                 "--overlay", "--model", "tiny", "--no-progress"]) == 0
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted(f"img{i}_{kind}.png" for i in range(2) for kind in ("mask", "color", "overlay"))
    assert sorted(dst.name for _, dst in renames if dst.parent == out and dst.suffix == ".png") == written
    assert all(src.parent == out and src.name.startswith(".tmp-") for src, dst in renames if dst.parent == out)


def test_cli_segment_walks_subfolders_and_keeps_their_layout(shared_server, tiny_ref, tmp_path):
    """Images in subfolders are segmented too (before, only the folder's own files were: the rest was skipped
    without a word), their masks keep the folder layout under --out, and an --out inside the input folder is
    not walked, so running the command again does not segment its own masks."""
    from segsvc.cli import main

    images = tmp_path / "in"
    originals = {"a": make_image(36, 44, seed=400), "sub/b": make_image(40, 32, seed=401),
                 "sub/deeper/c": make_image(28, 52, seed=402)}
    for name, image in originals.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / f"{name}.png").write_bytes(encode(image))
    out = images / "masks"
    for _ in range(2):
        assert main(["segment", str(images), "--server", shared_server.address, "--out", str(out),
                     "--model", "tiny", "--no-progress"]) == 0
        written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
        assert written == sorted(f"{name}_{kind}.png" for name in originals for kind in ("mask", "color"))
    for name, image in originals.items():
        mask = cv2.imread(str(out / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert_labels_match(mask, tiny_ref, image)


def test_cli_segment_writes_masks_and_overlays(shared_server, tiny_ref, tmp_path):
    from segsvc.cli import main

    images = tmp_path / "in"
    images.mkdir()
    originals = {}
    for i, (h, w) in enumerate([(40, 60), (52, 52)]):
        originals[f"img{i}"] = make_image(h, w, seed=200 + i)
        (images / f"img{i}.png").write_bytes(encode(originals[f"img{i}"]))
    out = tmp_path / "out"
    rc = main(["segment", str(images), "--server", shared_server.address, "--out", str(out),
               "--overlay", "--model", "tiny", "--no-progress"])
    assert rc == 0
    for name, image in originals.items():
        mask = cv2.imread(str(out / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED)
        assert_labels_match(mask, tiny_ref, image)
        over = decode_image((out / f"{name}_overlay.png").read_bytes())
        assert np.array_equal(over, overlay(image, mask, tiny_ref.manifest.palette, 0.5))
        assert (out / f"{name}_color.png").is_file()


def test_a_label_map_is_an_ordinary_writable_array(client):
    """``result.mask[result.mask == 2] = 0`` worked on PNG label maps and raised "assignment destination is
    read-only" on raw ones (a view of the response's bytes); confidence likewise."""
    image = make_image(20, 28, seed=14)
    for encoding in ("raw", "png"):
        result = client.segment(image, model="tiny", encoding=encoding, confidence=True)
        assert result.mask.flags.writeable and result.confidence.flags.writeable, encoding
        result.mask[result.mask == 2] = 0
        assert not (result.mask == 2).any()


def test_cli_segment_refuses_an_overlay_alpha_out_of_range_before_any_work(shared_server, tmp_path, capsys):
    """--alpha 1.5 was noticed only when the first overlay was blended, after the whole run was segmented, with
    that image's mask already written; it is named before connecting, and nothing is written."""
    from segsvc.cli import main

    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(encode(make_image(24, 24, seed=500)))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(["segment", str(images), "--server", shared_server.address, "--out", str(out), "--overlay",
              "--alpha", "1.5", "--model", "tiny", "--no-progress"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "segsvc segment: error: argument --alpha: must be a finite number in [0, 1], got 1.5\n"
    assert not out.exists() or not any(out.iterdir())


def test_cli_segment_keeps_the_masks_it_got_when_the_stream_breaks(start_server, tmp_path, monkeypatch, capsys):
    """The server stops after answering the first of three images: before, segment_many raised and threw away
    the answer it had, and `segsvc segment` wrote nothing, so everything had to be segmented again. Each mask is
    written as its answer arrives, and the error says how far the run got."""
    from segsvc.cli import main
    from segsvc.client import SegmentationClient
    from segsvc.inference.engine import Engine
    from segsvc.server.config import LimitsConfig
    from tests.server.conftest import publish

    v1 = publish(tmp_path / "repo", "m", seed=22)
    # one image of the stream in flight at a time: the second is read only once the first answer is taken
    server = start_server(tmp_path / "repo", limits=LimitsConfig(max_stream_in_flight=1))
    held, answered = threading.Event(), threading.Event()
    passes: list[int] = []
    run, label_map = Engine.run, SegmentationClient._label_map

    def first_pass_only(self, jobs):  # type: ignore[no-untyped-def]
        passes.append(len(jobs))
        if len(passes) > 1:
            assert held.wait(300), "the test never released the held forward pass"
        return run(self, jobs)

    def answer(response):  # type: ignore[no-untyped-def]
        result = label_map(response)
        answered.set()
        return result

    monkeypatch.setattr(Engine, "run", first_pass_only)
    monkeypatch.setattr(SegmentationClient, "_label_map", staticmethod(answer))
    stopping = []  # what SIGTERM runs, started once the client has its first answer

    def stop_after_the_first_answer() -> None:
        answered.wait(300)
        stopping.append(asyncio.run_coroutine_threadsafe(server.server.stop(0.0), server.loop))

    stopper = threading.Thread(target=stop_after_the_first_answer)
    stopper.start()
    images = tmp_path / "in"
    images.mkdir()
    originals = {f"img{i}": make_image(24, 32, seed=600 + i) for i in range(3)}
    for name, image in originals.items():
        (images / f"{name}.png").write_bytes(encode(image))
    out = tmp_path / "out"
    try:
        assert main(["segment", str(images), "--server", server.address, "--out", str(out),
                     "--model", "m", "--no-progress"]) == 2
    finally:
        answered.set()
        held.set()
        stopper.join(300)
        for stop in stopping:
            stop.result(300)
    err = capsys.readouterr().err
    assert "after 1 of 3 images" in err and "Traceback" not in err, err
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["img0_color.png", "img0_mask.png"]
    mask = cv2.imread(str(out / "img0_mask.png"), cv2.IMREAD_UNCHANGED)
    assert_labels_match(mask, reference(v1), originals["img0"])


def test_a_stream_past_its_deadline_says_the_deadline_bounds_the_whole_stream(start_server, tmp_path, gated):
    """segment_many's timeout_s (default: the client's 60 s "deadline of each call") bounds the whole stream, so a
    long list fails with it however fast each image is; the error said only "Deadline Exceeded"."""
    from segsvc import errors
    from tests.server.conftest import publish

    publish(tmp_path, "m", seed=23)
    server = start_server(tmp_path)
    try:  # every forward pass is held: the deadline passes whatever the host's load
        with server.client(timeout_s=2) as c, pytest.raises(errors.DeadlineExceeded) as late:
            c.segment_many([make_image(16, 16, seed=i) for i in range(2)], model="m", progress=False)
    finally:
        gated.gate.set()
    assert "2 s, the deadline of the whole stream, passed (timeout_s; segsvc segment --timeout-s)" in str(late.value)


def test_cli_segment_and_jobs_submit_send_the_tile_overlap(start_server, tmp_path, capsys):
    """The server's refusal of too many tiles says "use larger tiles or less overlap", yet segment and jobs submit
    had no --overlap (a satellite user's find). At --max-tiles 4, a 64x64 image in 32-pixel tiles is 4 tiles with
    no overlap and 9 with half a tile: the server counts the overlap the flag sends."""
    from segsvc.cli import main
    from segsvc.server.config import LimitsConfig
    from tests.server.conftest import publish

    publish(tmp_path / "repo", "tiny", seed=7)
    server = start_server(tmp_path / "repo", limits=LimitsConfig(max_tiles=4))
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    image.write_bytes(encode(make_image(64, 64, seed=501)))
    common = ["segment", str(image), "--server", server.address, "--model", "tiny", "--tile-size", "32",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "flat"), "--overlap", "0"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "half"), "--overlap", "0.5"]) == 1
    assert "needs 9 tiles, over the limit of 4" in capsys.readouterr().err
    assert main(["jobs", "submit", "x.png", "--server", server.address, "--overlap", "0.5"]) == 2
    assert capsys.readouterr().err.startswith("segsvc: error: --overlap needs --tile-size")
