"""A ModelInfer keeps the version it resolved while its tensors convert, whatever a swap does meanwhile."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import tritonclient.grpc as triton

from segsvc.server import oip_convert
from tests.server.conftest import assert_labels_match, make_image, publish, reference, wait_for

pytestmark = pytest.mark.timeout(300)


def test_a_swap_while_the_tensors_convert_does_not_take_the_resolved_version_away(start_server, tmp_path,
                                                                                   monkeypatch):
    """ModelInfer resolved ``m:1``, then converted its tensors on a thread. A LoadModel of version 2 in
    that gap retired version 1 (nothing held it yet), and the request's hold then loaded it again from
    disk: here its folder had gone, so the request failed, where a swap may fail no request."""
    first = publish(tmp_path, "m", seed=31)
    ref = reference(first)
    server = start_server(tmp_path, poll_interval_s=0.0)
    converting, go = threading.Event(), threading.Event()
    convert = oip_convert.infer_call

    def held_convert(*args, **kwargs):  # type: ignore[no-untyped-def]
        converting.set()
        assert go.wait(120), "the test never let the conversion go on"
        return convert(*args, **kwargs)

    monkeypatch.setattr(oip_convert, "infer_call", held_convert)
    image = make_image(24, 32, seed=5)
    pixels = triton.InferInput("pixels", [1, 24, 32, 3], "UINT8")
    pixels.set_data_from_numpy(image[None])
    outcome: dict[str, object] = {}
    client = triton.InferenceServerClient(server.address)

    def infer() -> None:
        try:
            outcome["result"] = client.infer("m", [pixels])
        except triton.InferenceServerException as exc:  # asserted below
            outcome["error"] = f"{exc.status()}: {exc.message()}"

    caller = threading.Thread(target=infer)
    caller.start()
    try:
        assert converting.wait(120), "ModelInfer never converted its tensors"
        publish(tmp_path, "m", seed=32)
        with server.client() as admin:
            assert admin.load_model("m").version == 2
        shutil.rmtree(first)  # version 1 exists now only in the memory of the request that resolved it
        go.set()
        caller.join(120)
    finally:
        go.set()
        client.close()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.get_response().model_version == "1"
    labels = result.as_numpy("labels")
    assert labels.shape == (1, 24, 32)
    assert_labels_match(np.asarray(labels[0]), ref, image)  # served by version 1, as it says
    # once the request let go and the poll saw its folder gone, version 1 went (as the previous default it was
    # kept while on disk): version 2 alone is loaded
    server.call(server.manager.poll_once())
    wait_for(lambda: [lm.version for lm in server.manager.loaded("m")] == [2])
