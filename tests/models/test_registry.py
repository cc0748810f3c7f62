import pytest

from segsvc.config import ModelSpec
from segsvc.errors import ModelConfigError
from segsvc.models import MODELS, available_models, build_model


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ModelConfigError) as err:
        build_model(ModelSpec("fcn4s", 3))
    for name in ("fcn8s", "unet", "segnet", "smp/Unet"):
        assert name in str(err.value)


def test_unknown_parameter_names_the_accepted_ones() -> None:
    with pytest.raises(ModelConfigError, match="base_channels"):
        build_model(ModelSpec("unet", 3, params={"widht": 8}))


def test_bad_values_are_config_errors() -> None:
    with pytest.raises(ModelConfigError, match="variant"):
        build_model(ModelSpec("segnet", 3, params={"variant": "huge"}))
    with pytest.raises(ModelConfigError, match="depth"):
        build_model(ModelSpec("unet", 3, params={"depth": 0}))
    with pytest.raises(ModelConfigError, match="num_classes"):
        ModelSpec("unet", 0)
    for width in (-1, 0, 2.5, True):
        with pytest.raises(ModelConfigError, match="base_channels"):
            build_model(ModelSpec("unet", 3, params={"base_channels": width}))


def test_errors_raised_inside_a_factory_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's own errors from impossible values are a ModelConfigError naming the params.

    Before, a RuntimeError escaped: a manifest with such params was an internal error to LoadModel. (A fractional
    U-Net depth and a negative FCN width, the examples here before, are now refused by the models themselves,
    naming the parameter; a stand-in factory raising as torch does keeps the wrapper tested.)"""

    def factory(num_classes: int, in_channels: int, width: int = 1) -> None:
        raise RuntimeError("Trying to create tensor with negative dimension")

    monkeypatch.setitem(MODELS, "broken", factory)
    with pytest.raises(ModelConfigError, match=r"cannot build 'broken' with params \{'width': -1\}"):
        build_model(ModelSpec("broken", 3, params={"width": -1}))
    with pytest.raises(ModelConfigError, match=r"U-Net depth must be a positive integer .*got 2.5"):
        build_model(ModelSpec("unet", 3, params={"depth": 2.5}))
    with pytest.raises(ModelConfigError, match=r"FCN base_channels must be a positive integer"):
        build_model(ModelSpec("fcn8s", 3, params={"base_channels": -1}))


def test_seed_models_are_registered() -> None:
    assert {"fcn32s", "fcn16s", "fcn8s", "unet", "segnet"} <= set(available_models())


def test_spec_round_trips_through_dict() -> None:
    spec = ModelSpec("unet", 4, 1, {"base_channels": 8})
    assert ModelSpec.from_dict(spec.to_dict()) == spec
