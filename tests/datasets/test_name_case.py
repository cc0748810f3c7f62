"""Dataset names are unique without regard to case, but matched exactly: another case is suggested, not resolved."""

from __future__ import annotations

import pytest

from segsvc import errors
from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from tests.datasets.helpers import synth


@pytest.fixture
def registry(tmp_path):
    root = tmp_path / "data"
    synth(root / "small")
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=root))
    reg.register("small", name="small")
    yield reg
    reg.close()


def test_a_name_in_another_case_is_not_found_and_the_registered_name_is_suggested(registry):
    with pytest.raises(errors.NotFound) as caught:
        registry.get("SMALL")
    assert str(caught.value) == "no dataset named 'SMALL' (nor with that hash); did you mean 'small'?"
    with pytest.raises(errors.NotFound, match="did you mean 'small'"):
        registry.check_unchanged("Small")


def test_an_unknown_name_suggests_nothing(registry):
    with pytest.raises(errors.NotFound) as caught:
        registry.get("large")
    assert str(caught.value) == "no dataset named 'large' (nor with that hash)"
    assert registry.get("small").name == "small"
