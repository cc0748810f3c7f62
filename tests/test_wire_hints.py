"""``wire``: the over-limit hint names a limit the side that hit it can set; raw label maps of the wrong size."""

from __future__ import annotations

import numpy as np
import pytest

from segsvc import errors
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.wire import labels_from_proto, over_limit


@pytest.mark.parametrize("what", ["request", "response"])
def test_a_client_side_refusal_names_the_python_argument_and_the_cli_flag(what: str) -> None:
    """It said "raise max_message_bytes", which no command-line user can set: the flag is --max-message-mb."""
    message = str(over_limit(what, 70_000_000, 67_108_864, client_side=True))
    assert "this client's limit of 67108864 bytes" in message
    assert "SegmentationClient(max_message_bytes=...)" in message
    assert "segsvc segment --max-message-mb" in message
    assert "segsvc serve" not in message  # the server's limit is not what refused it


@pytest.mark.parametrize("what", ["request", "response"])
def test_a_server_side_refusal_names_the_server_flag_only(what: str) -> None:
    error = over_limit(what, 70_000_000, 67_108_864, client_side=False)
    assert isinstance(error, errors.ImageTooLarge if what == "request" else errors.ResponseTooLarge)
    message = str(error)
    assert "the server's limit of 67108864 bytes" in message and "segsvc serve --max-message-mb" in message
    assert "max_message_bytes" not in message  # a client argument cannot raise the server's limit


@pytest.mark.parametrize(("encoding", "size"), [(pb.OUTPUT_ENCODING_RAW_UINT8, 10), (pb.OUTPUT_ENCODING_RAW_UINT16, 31),
                                               (pb.OUTPUT_ENCODING_RAW_UINT16, 16)])
def test_a_raw_label_map_of_the_wrong_size_is_an_invalid_image_not_a_value_error(encoding: int, size: int) -> None:
    """numpy's reshape raised ValueError ("cannot reshape array of size 10 into shape (4,4)") at the caller."""
    message = pb.LabelMap(height=4, width=4, encoding=encoding, data=b"\0" * size)
    with pytest.raises(errors.InvalidImage, match=rf"raw label map is {size} bytes; a 4x4 map of "):
        labels_from_proto(message)


def test_a_raw_label_map_of_the_right_size_decodes() -> None:
    data = np.arange(12, dtype="<u2").tobytes()
    labels = labels_from_proto(pb.LabelMap(height=3, width=4, encoding=pb.OUTPUT_ENCODING_RAW_UINT16, data=data))
    assert labels.dtype == np.uint16 and labels.tolist() == np.arange(12).reshape(3, 4).tolist()
