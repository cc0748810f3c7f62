"""The backend seam: one forward path (padding from the manifest, run, crop) for eager PyTorch and ONNX Runtime."""

from __future__ import annotations

import asyncio
import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from segsvc.config import InferenceSpec, ModelSpec
from segsvc.errors import ArtifactError, InvalidArgument
from segsvc.inference.backends import (
    EngineConfig,
    OnnxRuntimeBackend,
    TorchBackend,
    manifest_geometry,
    open_backend,
    open_version_dir,
)
from segsvc.inference.backends.eager import fold_into_convolutions
from segsvc.inference.batcher import BatchingConfig
from segsvc.inference.engine import Engine, InferenceOptions
from segsvc.inference.loader import VersionLoader
from segsvc.inference.predictor import Predictor
from segsvc.inference.repository import ModelRepository
from segsvc.models.artifact import MANIFEST_FILE, load_artifact, read_manifest, save_artifact
from segsvc.models.registry import build_model
from tests.conftest import assert_labels_agree
from tests.inference.test_contract import TINY, calibrated_model, smooth_image

CPU = torch.device("cpu")


def export_onnx(version_dir) -> None:
    """``segsvc export --format onnx`` with one check: model.onnx beside the weights, its SHA-256 in the manifest."""
    from segsvc.export.onnx import export_onnx as export

    export(version_dir, checks=1)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    model = calibrated_model()
    save_artifact(model, root, "plain", spec=TINY)
    save_artifact(model, root, "wide", spec=TINY, inference=InferenceSpec(stride=16, min_input_size=32))
    save_artifact(model, root, "tta", spec=TINY, inference=InferenceSpec(scale=0.5, tile_size=16, flip_tta=True))
    for name in ("plain", "tta"):
        export_onnx(root / name / "1")
    return root


def shapes_seen(backend: TorchBackend) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    backend.model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    return seen


def test_padding_comes_from_the_manifest_not_the_module(repo):
    model, manifest = load_artifact(repo / "wide" / "1")
    assert model.output_stride == 4  # the module alone would pad 37x45 to 40x48
    backend = TorchBackend.for_manifest(model, manifest, CPU)
    seen = shapes_seen(backend)
    out = backend.forward(torch.zeros(1, 3, 37, 45))
    assert seen == [(1, 3, 48, 48)]  # stride 16, at least 32: the manifest's
    assert tuple(out.shape) == (1, 3, 37, 45) and out.dtype == torch.float32  # cropped back


def test_a_published_manifest_always_records_the_padding(repo):
    """Backends without a module (ONNX) read the stride from the manifest: an explicit contract that
    leaves it unset gets the model's own at publication."""
    tta = read_manifest(repo / "tta" / "1").inference
    assert (tta.stride, tta.min_input_size, tta.scale) == (4, 1, 0.5)
    assert read_manifest(repo / "wide" / "1").inference.stride == 16  # an explicit one is kept


def test_manifest_geometry_needs_a_recorded_stride():
    assert manifest_geometry(InferenceSpec(stride=8, min_input_size=16)).stride == 8
    with pytest.raises(ArtifactError, match="no stride"):
        manifest_geometry(InferenceSpec())


@pytest.mark.parametrize("name", ["plain", "tta"])
def test_onnxruntime_gives_the_label_maps_of_eager_pytorch(repo, name):
    version = repo / name / "1"
    torch_backend, manifest = open_version_dir(version, CPU, EngineConfig(device="cpu"))
    ort_backend, _ = open_version_dir(version, CPU, EngineConfig(device="cpu", backend="onnxruntime"))
    assert isinstance(torch_backend, TorchBackend) and isinstance(ort_backend, OnnxRuntimeBackend)
    images = [smooth_image(61, 83, seed=1), smooth_image(62, 82, seed=2), smooth_image(40, 40, seed=3)]
    eager, ort = Predictor(torch_backend, manifest), Predictor(ort_backend, manifest)
    for image in images:
        a, b = eager.image_logits(image), ort.image_logits(image)
        assert torch.allclose(a, b, atol=1e-4)
        assert_labels_agree(ort.predict(image), a[0], dim=0)  # eager's labels, up to float-rounding ties
    # through the server's engine: batching by padded size, and the manifest's tiling + flip TTA
    engines = [Engine(p, EngineConfig(device="cpu", warmup=False)) for p in (eager, ort)]
    outs = [e.run([e.prepare(im, InferenceOptions()) for im in images[:2]]) if name == "plain"
            else [e.run([e.prepare(im, InferenceOptions())])[0] for im in images] for e in engines]
    for x, y in zip(*outs):
        assert np.array_equal(x.labels, y.labels) and len(np.unique(x.labels)) > 1


def test_an_onnx_file_that_does_not_match_its_manifest_is_refused(repo, tmp_path):
    import shutil

    version = tmp_path / "plain" / "1"
    shutil.copytree(repo / "plain" / "1", version)
    with (version / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match the SHA-256"):
        open_version_dir(version, CPU, EngineConfig(device="cpu", backend="onnxruntime"))
    (version / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        open_version_dir(version, CPU, EngineConfig(device="cpu", backend="onnxruntime"))


def test_a_version_without_an_export_names_the_command_that_makes_one(repo):
    with pytest.raises(ArtifactError, match="segsvc export wide:1 --format onnx"):
        open_backend(ModelRepository(repo), "wide", 1, CPU, EngineConfig(device="cpu", backend="onnxruntime"))


def test_the_backend_is_chosen_per_model_then_server_then_manifest(repo, tmp_path):
    config = EngineConfig(device="cpu", backend="onnxruntime", model_backends=(("tta", "torch"),))
    assert config.backend_for("plain", "torch") == "onnxruntime"
    assert config.backend_for("tta", "onnxruntime") == "torch"
    assert EngineConfig().backend_for("plain", "onnxruntime") == "onnxruntime"
    with pytest.raises(InvalidArgument, match="backend must be one of"):
        EngineConfig(backend="tensorrt")
    # a manifest that asks for onnxruntime gets it without any server setting
    manifest_path = repo / "plain" / "1" / MANIFEST_FILE
    data = json.loads(manifest_path.read_text())
    data["inference"]["backend"] = "onnxruntime"
    own = tmp_path / "own" / "plain" / "1"
    own.mkdir(parents=True)
    for f in (repo / "plain" / "1").iterdir():
        (own / f.name).write_bytes(f.read_bytes())
    (own / MANIFEST_FILE).write_text(json.dumps(data))
    backend, _ = open_backend(ModelRepository(own.parent.parent), "plain", 1, CPU, EngineConfig(device="cpu"))
    assert isinstance(backend, OnnxRuntimeBackend)


def channels_last(module: torch.nn.Module) -> bool:
    """Whether every convolution's weight is in the channels-last layout (a 1x1 kernel's is both layouts at once)."""
    weights = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.weight[0, 0].numel() > 1]
    return bool(weights) and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                                 for w in weights)


def test_a_convolutional_network_runs_channels_last_on_cpu(repo):
    """oneDNN's convolutions are 1.1-1.75x faster channels-last on this project's CNNs (bench/bench_backends.py);
    the labels are the contiguous network's."""
    model, manifest = load_artifact(repo / "plain" / "1")
    reference, _ = load_artifact(repo / "plain" / "1")
    backend = TorchBackend.for_manifest(model, manifest, CPU)
    inputs = []
    backend.model.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    x = torch.randn(2, 3, 37, 45)
    out = backend.forward(x)
    assert backend.channels_last and channels_last(backend.model)
    assert inputs[0].is_contiguous(memory_format=torch.channels_last) and not inputs[0].is_contiguous()
    plain = TorchBackend.for_manifest(reference, manifest, CPU, EngineConfig(device="cpu", channels_last=False))
    assert not plain.channels_last and not channels_last(plain.model)
    torch.testing.assert_close(out, plain.forward(x), rtol=1e-4, atol=1e-4)
    assert_labels_agree(out.argmax(1), plain.forward(x))


def test_a_network_with_linear_layers_stays_contiguous_on_cpu(repo):
    """Token layers pay for the layout conversions: smp Segformer ran 0.88x channels-last."""
    model, manifest = load_artifact(repo / "plain" / "1")
    model.head = torch.nn.Linear(3, 3)  # present, unused: what counts is that the network has one
    backend = TorchBackend.for_manifest(model, manifest, CPU)
    assert not backend.channels_last and not channels_last(backend.model)


def batchnorms(module: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())


def with_running_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` in eval mode with BatchNorm statistics and affine terms far from the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats:
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.1)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("spec, kept", [
    (TINY, 0),
    (ModelSpec("fcn8s", 5, 3, {"base_channels": 4, "fc_channels": 16, "batch_norm": True}), 0),
    (ModelSpec("segnet", 5, 3, {"variant": "basic", "base_channels": 4}), 0),
    # smp: MobileNetV2's stages are slices of one Sequential of conv-BN blocks (get_stages)
    (ModelSpec("smp/FPN", 5, 3, {"encoder_name": "mobilenet_v2"}), 0),
    # torchvision's ResNet blocks (NAMED_PAIRS); the encoder's stem, run by its own forward, keeps its BatchNorm
    (ModelSpec("smp/Unet", 5, 3, {"encoder_name": "resnet18"}), 1),
], ids=lambda p: getattr(p, "arch", str(p)))
def test_folding_batchnorm_keeps_the_logits(spec, kept):
    """The BatchNorm layers that follow a convolution (in a Sequential, or in a ResNet block) are folded,
    and the network computes what it did (to float rounding), labels included."""
    torch.manual_seed(0)
    model = with_running_statistics(build_model(spec))
    reference = copy.deepcopy(model)
    before = batchnorms(model)
    assert before > kept
    assert fold_into_convolutions(model) == before - kept
    assert batchnorms(model) == kept
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert_labels_agree(out.argmax(1), expected)


def test_folding_takes_a_transpose_convolution_and_leaves_what_it_cannot_fold():
    nn = torch.nn

    class OwnConv(nn.Conv2d):  # a subclass may compute something else with its weights
        pass

    relu = nn.ReLU()
    model = with_running_statistics(nn.Sequential(
        nn.ConvTranspose2d(3, 4, 2, stride=2), nn.BatchNorm2d(4),  # folded (transpose weights)
        relu, nn.Conv2d(4, 4, 3, padding=1), relu, nn.BatchNorm2d(4),  # not right after a convolution (the
        # same ReLU twice: a listing without repeats would make the convolution and the BatchNorm neighbours)
        OwnConv(4, 4, 1), nn.BatchNorm2d(4),  # not a plain convolution
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),  # uses batch statistics
    ))
    reference = copy.deepcopy(model)
    assert fold_into_convolutions(model) == 1
    assert isinstance(model[1], nn.Identity) and batchnorms(model) == 3
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


def test_folding_leaves_grouped_transpose_convolutions_and_sequentials_with_their_own_forward():
    """Both were folded: torch cannot fuse a grouped transpose convolution (the model then failed to load or
    run), and a Sequential subclass may use a convolution's output twice (its output changed by up to 0.9)."""
    nn = torch.nn

    class Residual(nn.Sequential):
        def forward(self, x):  # type: ignore[override]
            y = self[0](x)
            return self[1](y) + y

    model = with_running_statistics(nn.Sequential(
        nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4),
        Residual(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
    ))
    reference = copy.deepcopy(model)
    assert fold_into_convolutions(model) == 0 and batchnorms(model) == 2
    x = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x))


def test_folding_refuses_a_model_in_training_mode():
    model = build_model(TINY).train()
    with pytest.raises(ValueError, match="eval mode"):
        fold_into_convolutions(model)
    assert batchnorms(model) > 0


def test_a_loaded_artifact_runs_with_its_batchnorm_folded(repo):
    """The server and batch jobs load artifacts through open_version_dir / open_backend, which own the
    module: its BatchNorm layers are folded (EngineConfig(fold_batchnorm=False) keeps them), with the same labels.
    A caller's own module (Predictor(module, manifest)) is left as it was."""
    cpu = EngineConfig(device="cpu")
    folded, _ = open_version_dir(repo / "plain" / "1", CPU, cpu)
    kept, _ = open_version_dir(repo / "plain" / "1", CPU, replace(cpu, fold_batchnorm=False))
    served, _ = open_backend(ModelRepository(repo), "plain", 1, CPU, cpu)
    assert folded.folded > 0 and batchnorms(folded.model) == 0 and served.folded == folded.folded
    assert kept.folded == 0 and batchnorms(kept.model) == folded.folded
    x = torch.randn(2, 3, 37, 45)
    torch.testing.assert_close(folded.forward(x), kept.forward(x), rtol=1e-4, atol=1e-4)
    assert_labels_agree(folded.forward(x).argmax(1), kept.forward(x))
    # the Identity left in a folded BatchNorm's place returns its input: not counted as a new output
    assert folded.measure_memory() <= kept.measure_memory()

    model, manifest = load_artifact(repo / "plain" / "1")
    layers = batchnorms(model)
    Predictor(model, manifest).predict(smooth_image(37, 45))
    assert batchnorms(model) == layers


def test_compile_is_refused_on_cpu(repo):
    model, manifest = load_artifact(repo / "plain" / "1")
    with pytest.raises(InvalidArgument, match="CUDA only"):
        TorchBackend.for_manifest(model, manifest, CPU, EngineConfig(device="cpu", compile=True))


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_loaded_version_has_its_memory_measured(repo, backend):
    """Admission's memory budget needs each version's bytes per pixel; 0 would admit anything."""
    loader = VersionLoader(ModelRepository(repo), EngineConfig(device="cpu", backend=backend, warmup=False),
                           BatchingConfig(), CPU)

    async def load():  # type: ignore[no-untyped-def]
        [entry] = await loader.scan("plain")
        lm = await loader.build("plain", entry, auto=True)
        await lm.batcher.stop()
        return lm

    lm = asyncio.run(load())
    assert lm.engine.backend.name == backend
    assert lm.engine.bytes_per_pixel > 1.0  # measured (1.0 is the floor; 0 admitted any size before)


def test_an_onnx_versions_memory_does_not_depend_on_earlier_traffic(repo):
    """The onnxruntime backend measured the growth of the process's resident memory over one pass: after
    traffic the allocator reuses freed memory, nothing grows, and a version loaded then (a reload, a new
    version found by the poll) measured the floor of 1 byte per pixel, so admission let any image in."""
    version_dir = repo / "plain" / "1"
    manifest = read_manifest(version_dir)
    first = OnnxRuntimeBackend.for_manifest(version_dir, manifest, CPU)
    before = first.measure_memory()
    for side in (1024, 1536, 1024):  # traffic: large passes whose memory is freed and kept by the allocator
        first.forward(first.probe_input(side))
    again = [OnnxRuntimeBackend.for_manifest(version_dir, manifest, CPU).measure_memory() for _ in range(3)]
    assert again == [before] * 3
    # the same order as the torch backend's count of the same network's layer outputs
    eager = TorchBackend.for_manifest(*load_artifact(version_dir), CPU).measure_memory()
    assert eager / 2 <= before <= eager * 4, (before, eager)


def test_an_onnx_graph_whose_shapes_are_known_is_counted_without_running_it(repo, monkeypatch):
    """The count ran a second ONNX Runtime session with every node output returned: for FCN-8s (537 MB of
    weights) four copies of the weights at once, 1.5 GB over the load's own peak and 7 s. Shape inference on
    the graph without its weights gives the same sizes; a session runs only where a shape stays unknown."""
    import segsvc.inference.backends.ort as ort_backend

    data = ort_backend.read_onnx_export(repo / "plain" / "1", read_manifest(repo / "plain" / "1"))[1]
    probe = np.zeros((1, 3, 64, 64), np.float32)
    light = ort_backend._light(__import__("onnx").load_model_from_string(data), probe.shape)
    assert ort_backend._inferred_sizes(light) == ort_backend._run_sizes(data, light, probe)  # the same sizes
    counted = ort_backend.peak_live_tensors(data, probe)

    def no_session(*_args):  # type: ignore[no-untyped-def]
        raise AssertionError("a session was run for a graph whose shapes shape inference knows")

    monkeypatch.setattr(ort_backend, "_run_sizes", no_session)
    assert ort_backend.peak_live_tensors(data, probe) == counted > 0


def test_training_validation_runs_the_same_backend(repo):
    """The trainer's evaluate() takes a backend: same padding and crop as serving."""
    from torch.utils.data import DataLoader, TensorDataset

    from training.train import evaluate

    model, manifest = load_artifact(repo / "wide" / "1")
    backend = TorchBackend.for_manifest(model, manifest, CPU)
    seen = shapes_seen(backend)
    images = torch.randn(2, 3, 37, 45)
    masks = torch.zeros(2, 37, 45, dtype=torch.int64)
    metrics = evaluate(backend, DataLoader(TensorDataset(images, masks), batch_size=2), 3, None, progress=False)
    assert seen == [(2, 3, 48, 48)]
    expected = (Predictor(backend, replace(manifest, inference=manifest.inference)).logits(images)).argmax(1)
    assert metrics.pixel_accuracy == pytest.approx(float((expected == 0).float().mean()))


def test_an_export_of_an_old_manifest_pads_as_the_export_recorded(repo, tmp_path):
    """Manifests published before the contract recorded a stride: the export's own record serves."""
    import shutil

    version = tmp_path / "old" / "1"
    shutil.copytree(repo / "plain" / "1", version)
    data = json.loads((version / MANIFEST_FILE).read_text())
    data["inference"]["stride"] = data["inference"]["min_input_size"] = None
    (version / MANIFEST_FILE).write_text(json.dumps(data))
    backend, _ = open_version_dir(version, CPU, EngineConfig(device="cpu", backend="onnxruntime"))
    assert (backend.geometry.stride, backend.geometry.min_size) == (4, 1)


def test_onnxruntime_threads_sleep_when_idle(repo):
    """Spinning ORT threads shared 2 cores with the server's torch work between runs: FCN-8s at batch 1
    ran at 0.73x eager with spinning, 1.41x without (bench/bench_backends.py)."""
    backend, _ = open_version_dir(repo / "plain" / "1", CPU, EngineConfig(device="cpu", backend="onnxruntime"))
    options = backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == torch.get_num_threads()


class _Upscaling(torch.nn.Module):
    """A network that breaks the contract as smp FPN with encoder_depth=3 did: logits 2x the input."""

    output_stride = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x[:, :2], scale_factor=2.0, mode="nearest")


def test_logits_of_another_size_than_the_padded_input_are_refused_not_cropped():
    from segsvc.inference.contract import Geometry

    backend = TorchBackend(_Upscaling(), Geometry(8, 8), CPU, 3)
    with pytest.raises(ArtifactError, match=r"logits \[1, 2, 80, 96\] for an input of \[1, 3, 40, 48\]") as info:
        backend.forward(torch.randn(1, 3, 37, 45))  # padded to 40 x 48; the top-left 37 x 45 used to come back
    assert "/" not in str(info.value).replace("[N, C, H, W] -> [N, K, H, W]", "")  # no server path
    with pytest.raises(ArtifactError):
        backend.warmup(64)  # so a version with such a network fails at load, not at its first request


def test_the_onnxruntime_backend_refuses_logits_of_another_size_too(repo, monkeypatch):
    backend = OnnxRuntimeBackend.for_manifest(repo / "plain" / "1", read_manifest(repo / "plain" / "1"), CPU)
    run = OnnxRuntimeBackend.run
    monkeypatch.setattr(OnnxRuntimeBackend, "run", lambda self, padded: run(self, padded)[:, :, ::2, ::2])
    with pytest.raises(ArtifactError, match="contract"):
        backend.forward(torch.randn(2, 3, 37, 45))
