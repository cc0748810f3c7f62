import numpy as np
import pytest
import torch

from segsvc.config import ModelSpec
from segsvc.errors import InvalidImage, ModelConfigError
from segsvc.inference.predictor import Predictor, labels_dtype, pad_to_multiple, padded_size
from segsvc.models import build_model
from segsvc.models.artifact import load_artifact, save_artifact


@pytest.mark.parametrize("h,w,m,expected", [(37, 51, 8, (40, 56)), (32, 32, 32, (32, 32)), (1, 1, 16, (16, 16))])
def test_padded_size(h, w, m, expected) -> None:
    assert padded_size(h, w, m) == expected


def test_pad_to_multiple_keeps_content_and_reports_size() -> None:
    x = torch.randn(2, 3, 37, 51)
    padded, size = pad_to_multiple(x, 16)
    assert padded.shape == (2, 3, 48, 64) and size == (37, 51)
    assert torch.equal(padded[:, :, :37, :51], x)
    assert padded[:, :, 37:].abs().sum() == 0


def test_a_model_spec_has_at_most_as_many_classes_as_uint16_labels_hold() -> None:
    """Class 65536 of a 70000-class model would be written as label 0: such a spec is refused when it is built."""
    assert ModelSpec("unet", 65_536).num_classes == 65_536 and labels_dtype(65_536) == np.uint16
    assert labels_dtype(256) == np.uint8 and labels_dtype(257) == np.uint16
    with pytest.raises(ModelConfigError, match=r"num_classes must be at most 65536 \(labels are uint16\), got 70000"):
        ModelSpec("unet", 70_000)
    with pytest.raises(ModelConfigError, match="num_classes must be at most 65536"):
        ModelSpec.from_dict({"arch": "unet", "num_classes": 65_537})


@pytest.fixture
def predictor(tmp_path) -> Predictor:
    spec = ModelSpec("segnet", 4, 3, {"variant": "basic", "base_channels": 8})
    path = save_artifact(build_model(spec), tmp_path, "toy", spec=spec)
    model, manifest = load_artifact(path)
    return Predictor(model, manifest)


def test_predict_any_size_and_batch_matches_single(predictor: Predictor) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(37, 51, 3), (37, 51, 3), (20, 99, 3), (30, 30)]]
    batch = predictor.predict_batch(images)
    for image, labels in zip(images, batch):
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint8
        assert labels.max() < 4
        np.testing.assert_array_equal(labels, predictor.predict(image))


def test_predict_rejects_non_images(predictor: Predictor) -> None:
    with pytest.raises(InvalidImage, match="uint8"):
        predictor.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(InvalidImage, match="empty"):
        predictor.predict(np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(InvalidImage, match="channels"):
        predictor.predict(np.zeros((8, 8, 2), np.uint8))
