"""UnloadModel and the Open Inference Protocol's RepositoryModelUnload refuse a model a batch job holds.

Both go through ``ModelManager.unload``; the refusal (``FailedPrecondition``) reaches each client as
FAILED_PRECONDITION through the one error table, with the message saying what holds it and what to do.
"""

from __future__ import annotations

import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from segsvc.errors import FailedPrecondition
from tests.server.conftest import publish

# tritonclient calls have no deadline by default: only a hang trips this, never a slow, loaded machine.
pytestmark = pytest.mark.timeout(300)


async def _release(manager, name: str, version: int) -> None:  # type: ignore[no-untyped-def]
    manager.release(name, version, job=True)  # on the server's loop, as a batch job's end is


def test_both_unload_calls_are_refused_while_a_batch_job_holds_the_model(start_server, tmp_path):
    repo = tmp_path / "repo"
    publish(repo, "tiny", seed=1)
    server = start_server(repo)
    server.call(server.manager.retain("tiny", 1, job=True))  # a batch job pinned to tiny:1
    triton_client = triton.InferenceServerClient(server.address)
    try:
        with server.client() as client:
            with pytest.raises(InferenceServerException, match="model 'tiny' version 1 is in use by 1 batch job: "
                                                               "cancel them") as info:
                triton_client.unload_model("tiny")
            assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
            with pytest.raises(FailedPrecondition, match="version 1 is in use by 1 batch job"):
                client.unload_model("tiny")
            with pytest.raises(FailedPrecondition, match="version 1 is in use by 1 batch job"):
                client.unload_model("tiny", 1)
            assert triton_client.is_model_ready("tiny", "1")
            server.call(_release(server.manager, "tiny", 1))  # the job ends
            triton_client.unload_model("tiny")
            assert not triton_client.is_model_ready("tiny")
    finally:
        triton_client.close()
