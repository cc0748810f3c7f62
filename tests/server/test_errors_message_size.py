"""An error message that echoes long non-ASCII request text still reaches the caller as that error.

The message travels twice in the trailers: percent-encoded in ``grpc-message`` (3 bytes per UTF-8 byte
outside printable ASCII, so 12 per emoji) and inside the ``google.rpc.Status``. Cut at 1024 *characters*,
a model name of 2000 emoji made trailers over the client's hard metadata limit (16 KiB): the caller got
RESOURCE_EXHAUSTED "received metadata size exceeds hard limit", which reads as ``Overloaded`` (retry), instead
of INVALID_ARGUMENT naming the bad name. CJK text went over the soft limit, failing one call in two.
"""

from __future__ import annotations

import urllib.parse

import grpc
import pytest

from segsvc import errors
from segsvc.server import errors as server_errors
from segsvc.server.errors import status_of
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from segsvc.wire import error_from_rpc


def _wire_size(message: str) -> int:
    """Bytes of ``message`` in the ``grpc-message`` trailer (gRPC percent-encodes all but printable ASCII)."""
    return len(urllib.parse.quote(message.encode(), safe=bytes(range(0x20, 0x7f)).replace(b"%", b"")))


@pytest.mark.parametrize("name", ["\U0001F600" * 2000, "\u6a21" * 2000, "\u00e9" * 3000])
def test_a_long_non_ascii_name_gets_its_own_error_not_a_metadata_overflow(shared_server, name):
    with grpc.insecure_channel(shared_server.address) as channel:
        stub = pb_grpc.SegmentationServiceStub(channel)
        for _ in range(4):  # over the soft limit gRPC refuses at random: one call could pass by chance
            with pytest.raises(grpc.RpcError) as info:
                stub.GetModel(pb.GetModelRequest(model=name), timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert info.value.details().startswith("invalid model name '")
            assert isinstance(error_from_rpc(info.value), errors.InvalidArgument)


@pytest.mark.parametrize("text", ["x" * 5000, "\U0001F600" * 5000, "\u6a21" * 5000, "a\u00e9" * 3000, "%" * 5000])
def test_messages_are_cut_by_their_size_on_the_wire(text):
    code, message, kind = status_of(errors.InvalidArgument(f"bad: {text}"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and kind == "InvalidArgument"
    assert message.startswith("bad: ") and message.endswith("...")
    limit = server_errors.MAX_MESSAGE_BYTES
    assert limit - 12 <= _wire_size(message) <= limit, _wire_size(message)


def test_short_and_ascii_messages_are_kept_as_they_were():
    assert status_of(errors.UnknownModel("model 'x' is not loaded"))[1] == "model 'x' is not loaded"
    assert status_of(errors.UnknownModel("caf\u00e9 \U0001F600"))[1] == "caf\u00e9 \U0001F600"
    ascii_1024 = "y" * 1024
    assert status_of(errors.InvalidArgument(ascii_1024))[1] == ascii_1024  # the old limit, in characters
