"""The Python client takes ``model="NAME:VERSION"`` as the command line's ``--model`` does.

``segment(path, model="synthetic-quick:1")`` sent the whole reference as the model's name: "model
'synthetic-quick:1' is not loaded". Every call that names a model and a version parses it
(``segsvc.model_names.parse_model_ref``); a ``version=`` that says otherwise is refused, naming both.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from google.longrunning.operations_pb2 import Operation

from segsvc.client import SegmentationClient
from segsvc.errors import InvalidArgument
from segsvc.model_names import check_name, parse_model_ref
from tests.server.conftest import encode, make_image, publish, start_server  # noqa: F401  (a real server)

IMAGE = np.zeros((4, 4, 3), np.uint8)


@pytest.mark.parametrize(("options", "expected"), [
    ({"model": "m:3"}, ("m", 3)),
    ({"model": "m:3", "version": 3}, ("m", 3)),
    ({"model": "m:3", "version": 0}, ("m", 3)),  # 0: the default version, i.e. none given
    ({"model": "m", "version": 2}, ("m", 2)),
    ({"model": "m"}, ("m", 0)),
    ({}, ("", 0)),
])
def test_a_version_in_the_model_name_reaches_the_request(options, expected):
    request = SegmentationClient.build_request(IMAGE, **options)
    assert (request.model, request.version) == expected


@pytest.mark.parametrize(("options", "message"), [
    ({"model": "m:3", "version": 2}, "model 'm:3' names version 3, and version=2 another"),
    ({"model": "m:0"}, "the version after ':' must be a positive integer"),
    ({"model": "m:03"}, "the version after ':' must be a positive integer"),
    ({"model": "m:"}, "the version after ':' must be a positive integer"),
    ({"model": "m:1:2"}, "the version after ':' must be a positive integer"),
    ({"model": ":1"}, "invalid model name ''"),
    ({"model": "m:99999999999"}, "version must be a positive integer"),  # past the uint32 field
])
def test_a_bad_or_contradicting_reference_is_refused_by_name(options, message):
    with pytest.raises(InvalidArgument, match=message):
        SegmentationClient.build_request(IMAGE, **options)


def test_model_names_cannot_hold_a_colon_so_a_reference_has_one_reading():
    with pytest.raises(InvalidArgument, match="invalid model name"):
        check_name("m:1")
    assert parse_model_ref("a.b-c_d:12") == ("a.b-c_d", 12)


def test_every_call_that_names_a_model_and_a_version_parses_the_reference():
    sent: list = []

    def call(stub, method, request, timeout_s=None):  # type: ignore[no-untyped-def]
        sent.append(request)
        return SimpleNamespace(unloaded_versions=[2])

    with SegmentationClient("127.0.0.1:1", timeout_s=10) as c:  # nothing listens there: every call is caught
        c._call = call  # type: ignore[method-assign]
        c._job_call = lambda method, request, timeout_s=None: (sent.append(request), Operation(name="jobs/j"))[1]
        c._label_map = lambda response: response  # type: ignore[method-assign]
        c.get_model("m:2")
        c.load_model("m:2")
        assert c.unload_model("m:2", 2) == [2]
        c.set_default_version("m:2", None)
        c.segment(IMAGE, model="m:2")
        assert c.submit_job(["a"], model="m:2").id == "j"
        assert [(type(r).__name__, r.model, r.version) for r in sent] == [
            (name, "m", 2) for name in ("GetModelRequest", "LoadModelRequest", "UnloadModelRequest",
                                        "SetDefaultVersionRequest", "SegmentRequest",
                                        "SubmitSegmentationJobRequest")]
        for call in (c.get_model, c.load_model, c.unload_model, c.set_default_version):
            with pytest.raises(InvalidArgument, match="names version 2, and version=3"):
                call("m:2", 3)
        with pytest.raises(InvalidArgument, match="names version 2, and version=3"):
            c.segment_many([IMAGE], progress=False, model="m:2", version=3)
        with pytest.raises(InvalidArgument, match="names version 2, and version=3"):
            c.submit_job(["a"], model="m:2", version=3)
        assert len(sent) == 6


def test_segment_with_a_versioned_name_reaches_that_version(tmp_path, start_server):  # noqa: F811
    publish(tmp_path / "repo", "synthetic-quick", seed=1)
    server = start_server(tmp_path / "repo")
    with SegmentationClient(server.address, timeout_s=60) as client:
        image = encode(make_image(16, 16, seed=2))
        result = client.segment(image, model="synthetic-quick:1")
        assert (result.model, result.version) == ("synthetic-quick", 1)
        (many,) = client.segment_many([image], progress=False, model="synthetic-quick:1")
        assert (many.model, many.version) == ("synthetic-quick", 1)
        assert client.get_model("synthetic-quick:1").name == "synthetic-quick"
