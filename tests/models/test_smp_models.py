"""Every smp architecture through the shared tester, plus weights handling."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from segsvc.config import ModelSpec
from segsvc.errors import ModelConfigError
from segsvc.models import build_model
from segsvc.models.smp import ARCHITECTURES
from tests.models.base import ModelTester

ENCODER = {"encoder_name": "resnet18"}
PER_ARCH = {"DPT": {"encoder_name": "tu-vit_tiny_patch16_224"}}


def _tester(arch: str) -> type:
    attrs = {"arch": f"smp/{arch}", "params": PER_ARCH.get(arch, ENCODER)}
    if arch == "PAN":  # its pyramid attention needs at least 8x its stride
        attrs["sizes"] = [(129, 130)]
    return type(f"TestSmp{arch}", (ModelTester,), attrs)


for _arch in ARCHITECTURES:
    globals()[f"TestSmp{_arch}"] = _tester(_arch)


def test_every_smp_architecture_is_registered() -> None:
    from segsvc.models import available_models

    assert {f"smp/{a}" for a in ARCHITECTURES} <= set(available_models())
    assert len(ARCHITECTURES) == 12


def test_hub_weights_fail_fast_with_instructions() -> None:
    with pytest.raises(ModelConfigError, match="encoder_weights_path"):
        build_model(ModelSpec("smp/Unet", 2, params={"encoder_name": "resnet18", "encoder_weights": "imagenet"}))


def test_local_encoder_weights_initialise_the_encoder(tmp_path) -> None:
    donor = build_model(ModelSpec("smp/Unet", 2, params=ENCODER))
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in donor.net.encoder.state_dict().items()}, str(path))
    model = build_model(ModelSpec("smp/Unet", 2, params={**ENCODER, "encoder_weights_path": str(path)}))
    for key, value in donor.net.encoder.state_dict().items():
        assert torch.equal(model.net.encoder.state_dict()[key], value), key


def test_local_encoder_weights_must_be_safetensors(tmp_path) -> None:
    path = tmp_path / "enc.pth"
    path.write_bytes(b"not a pickle we would ever load")
    with pytest.raises(ModelConfigError, match="safetensors"):
        build_model(ModelSpec("smp/Unet", 2, params={**ENCODER, "encoder_weights_path": str(path)}))


def test_wrong_encoder_weights_are_reported(tmp_path) -> None:
    path = tmp_path / "enc.safetensors"
    save_file({"foo": torch.zeros(3)}, str(path))
    with pytest.raises(ModelConfigError, match="lack"):
        build_model(ModelSpec("smp/Unet", 2, params={**ENCODER, "encoder_weights_path": str(path)}))


def test_smp_is_imported_only_when_an_smp_model_is_built() -> None:
    """Serving FCN, U-Net or SegNet never pays smp's start-up (timm, torchvision: about 1 s and 200 MiB)."""
    heavy = ("segmentation_models_pytorch", "timm", "torchvision")
    code = (
        "import sys\n"
        "import segsvc.cli, segsvc.server.app, segsvc.jobs.offline\n"
        "from segsvc.config import ModelSpec\n"
        "from segsvc.models import build_model\n"
        "build_model(ModelSpec('fcn8s', 3, params={'base_channels': 4, 'fc_channels': 8}))\n"
        f"print(*[m for m in {heavy!r} if m in sys.modules])\n"
        "build_model(ModelSpec('smp/Unet', 3, params={'encoder_name': 'resnet18'}))\n"
        "print('segmentation_models_pytorch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["", "True"]


def test_an_unknown_smp_architecture_names_the_valid_ones() -> None:
    from segsvc.models.smp import SmpModel

    with pytest.raises(ModelConfigError, match="unknown smp architecture 'Unet3'; valid: DPT, DeepLabV3"):
        SmpModel("Unet3", 2)


def _trained_elsewhere(tmp_path) -> tuple[torch.nn.Module, ModelSpec, str]:
    """An smp model whose encoder came from a local file, with weights that then moved away from it."""
    donor = build_model(ModelSpec("smp/Unet", 2, params=ENCODER))
    path = tmp_path / "training-host" / "enc.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in donor.net.encoder.state_dict().items()}, str(path))
    spec = ModelSpec("smp/Unet", 2, params={**ENCODER, "encoder_weights_path": str(path)})
    torch.manual_seed(3)
    model = build_model(spec)
    with torch.no_grad():  # "training": the saved weights differ from what the file initialised
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval(), spec, str(path)


def test_an_artifact_does_not_record_or_reopen_its_encoder_weights_file(tmp_path) -> None:
    """The file initialised the encoder on the training host; the artifact's weights replace it, so a
    server without the file loads the version and gets the same logits."""
    from pathlib import Path

    from segsvc.models.artifact import MANIFEST_FILE, load_artifact, read_manifest, save_artifact

    model, spec, path = _trained_elsewhere(tmp_path)
    version_dir = save_artifact(model, tmp_path / "repo", "m", spec=spec)
    Path(path).unlink()
    text = (version_dir / MANIFEST_FILE).read_text()
    assert path not in text and "encoder_weights_path" not in text
    assert read_manifest(version_dir).spec.params == ENCODER
    loaded, _ = load_artifact(version_dir)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_an_artifact_that_recorded_an_encoder_weights_file_loads_without_it(tmp_path) -> None:
    """Artifacts written before the path was dropped: the recorded path is ignored, never opened."""
    import json

    from segsvc.inference.repository import ModelRepository
    from segsvc.models.artifact import MANIFEST_FILE, load_artifact, save_artifact

    model, spec, path = _trained_elsewhere(tmp_path)
    version_dir = save_artifact(model, tmp_path / "repo", "m", spec=spec)
    manifest = version_dir / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    data["model"]["params"]["encoder_weights_path"] = path  # as an older segsvc wrote it
    manifest.write_text(json.dumps(data))
    (tmp_path / "training-host" / "enc.safetensors").unlink()
    loaded, read = load_artifact(version_dir)
    assert "encoder_weights_path" not in read.spec.params
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    ModelRepository(tmp_path / "repo").load("m", 1)  # the server's path too
