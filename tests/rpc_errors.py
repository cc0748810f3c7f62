"""A gRPC call's end as grpc raises it, for tests of what the client makes of one without a server."""

from __future__ import annotations

import grpc


class StatusError(grpc.RpcError):
    """What a failed call raises: its status code and message, no trailers; ``str()`` is the repr grpc gives
    (``_InactiveRpcError``), which no message shown to a user may quote."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return ()

    def __str__(self) -> str:
        return (f"<_InactiveRpcError of RPC that terminated with:\n\tstatus = {self._code}\n\tdetails = "
                f"\"{self._details}\"\n\tdebug_error_string = \"UNKNOWN:Error received from peer\">")
