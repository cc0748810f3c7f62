"""``SubmitTrainingJobRequest`` -> ``TrainingRequest``: what the wire may carry that the service must refuse."""

from __future__ import annotations

import pytest

from segsvc.errors import InvalidArgument
from segsvc.server.training import training_request_from_proto
from segsvc.v1 import training_pb2 as tpb


def _on_the_wire(**fields) -> tpb.SubmitTrainingJobRequest:  # type: ignore[no-untyped-def]
    message = tpb.SubmitTrainingJobRequest(dataset="d", recipe="r", **fields)
    return tpb.SubmitTrainingJobRequest.FromString(message.SerializeToString())


def test_an_unknown_promote_policy_is_refused_not_read_as_gate():
    """proto3 enums are open: a value this server does not know (a newer client's policy) used to become GATE."""
    with pytest.raises(InvalidArgument, match="promote"):
        training_request_from_proto(_on_the_wire(promote=9))


@pytest.mark.parametrize("value, policy", [(tpb.PROMOTE_POLICY_UNSPECIFIED, "gate"), (tpb.PROMOTE_POLICY_GATE, "gate"),
                                           (tpb.PROMOTE_POLICY_ALWAYS, "always"), (tpb.PROMOTE_POLICY_NEVER, "never")])
def test_every_known_policy_maps_to_its_name(value, policy):
    assert training_request_from_proto(_on_the_wire(promote=value)).promote == policy
