"""Every error status carries a standard ``google.rpc.Status`` with an ``ErrorInfo``, read here as a
non-segsvc client would: a raw stub and ``grpc_status.rpc_status.from_call``."""

from __future__ import annotations

import re

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from segsvc import errors
from segsvc.datasets.archive import ExtractLimits
from segsvc.datasets.registry import DatasetsConfig
from segsvc.inference.engine import Engine
from segsvc.server.errors import MAX_DETAILS_BYTES, status_details
from segsvc.v1 import datasets_pb2 as dpb
from segsvc.v1 import datasets_pb2_grpc as dpb_grpc
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from segsvc.wire import (DETAILS_KEY, ERROR_CODES, ERROR_DOMAIN, ERROR_KIND_KEY, error_from_rpc, error_from_status,
                         error_reason)
from tests.datasets.helpers import broken, member, tar_with
from tests.server.conftest import encode, make_image, publish


@pytest.fixture(scope="module")
def channel(shared_server):
    with grpc.insecure_channel(shared_server.address) as ch:
        yield ch


def _failed(call, *args, **kwargs) -> tuple[grpc.RpcError, status_pb2.Status]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=60, **kwargs)
    status = rpc_status.from_call(info.value)  # also checks that code and message match the call's
    assert status is not None, "no grpc-status-details-bin trailer"
    return info.value, status


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo:
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert info.domain == ERROR_DOMAIN == "segsvc.dev"
    return info


def _kind(exc: grpc.RpcError) -> str:
    return dict(exc.trailing_metadata() or ()).get("segsvc-error", "")


@pytest.mark.parametrize(
    "request_kwargs, code, reason, kind",
    [
        (dict(model="nope", image=encode(make_image(16, 16))), grpc.StatusCode.NOT_FOUND, "UNKNOWN_MODEL",
         "UnknownModel"),
        (dict(model="tiny", version=99, image=encode(make_image(16, 16))), grpc.StatusCode.NOT_FOUND,
         "UNKNOWN_VERSION", "UnknownVersion"),
        (dict(model="tiny", image=b"this is not an image"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_IMAGE",
         "InvalidImage"),
        (dict(model="tiny", raw=pb.RawImage(data=b"", shape=[10_000, 10_000])), grpc.StatusCode.INVALID_ARGUMENT,
         "IMAGE_TOO_LARGE", "ImageTooLarge"),
    ],
)
def test_segment_errors_carry_an_error_info(channel, request_kwargs, code, reason, kind):
    stub = pb_grpc.SegmentationServiceStub(channel)
    exc, status = _failed(stub.Segment, pb.SegmentRequest(request_id="rid-5", **request_kwargs))
    assert exc.code() == code and status.code == code.value[0] and status.message == exc.details()
    info = _error_info(status)
    assert info.reason == reason and dict(info.metadata) == {"requestId": "rid-5"}
    assert _kind(exc) == kind  # the segsvc trailer stays for older clients


def test_model_management_errors_name_a_generated_request_id(channel):
    stub = pb_grpc.SegmentationServiceStub(channel)
    exc, status = _failed(stub.GetModel, pb.GetModelRequest(model="nope"))
    info = _error_info(status)
    assert exc.code() == grpc.StatusCode.NOT_FOUND and info.reason == "UNKNOWN_MODEL"
    assert info.metadata["requestId"] == dict(exc.trailing_metadata())["x-request-id"] != ""


def test_a_failed_image_in_a_stream_carries_the_same_status_as_a_failed_unary_call(channel):
    stub = pb_grpc.SegmentationServiceStub(channel)
    bad = pb.SegmentRequest(request_id="rid-9", model="tiny", image=b"this is not an image")
    good = pb.SegmentRequest(request_id="rid-10", model="tiny", image=encode(make_image(16, 16)))
    responses = {r.request_id: r for r in stub.SegmentStream(iter([bad, good]), timeout=60)}
    error = responses["rid-9"].error
    assert error.status.code == error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert error.status.message == error.message and error.kind == "InvalidImage"
    info = _error_info(error.status)
    assert info.reason == "INVALID_IMAGE" and dict(info.metadata) == {"requestId": "rid-9"}
    _, unary = _failed(stub.Segment, bad)
    assert error.status == unary  # one status, however the image was sent
    assert not responses["rid-10"].HasField("error") and responses["rid-10"].labels


@pytest.mark.parametrize("state, code, reason", [("FAILED", grpc.StatusCode.ABORTED, "JOB_FAILED"),
                                                  ("CANCELLED", grpc.StatusCode.CANCELLED, "JOB_CANCELLED")])
@pytest.mark.parametrize("kind", ["segment", "train"])
def test_a_finished_jobs_operation_error_carries_an_error_info(state, code, reason, kind):
    from segsvc.jobs.store import Job
    from segsvc.server.convert import operation
    from segsvc.server.training import training_operation

    spec = {"dataset": {"name": "scans", "sha256": "0" * 64}, "model_name": "m", "recipe_name": "r"}
    job = Job(id="j-1", kind=kind, state=state, request_id=None, spec=spec if kind == "train" else {}, total=4, done=1, failed=0, skipped=3,
              created_at=0.0, updated_at=0.0, started_at=0.0, finished_at=1.0, cancel_requested=state == "CANCELLED",
              error="the model version was deleted" if state == "FAILED" else None, result=None, progress={}, seq=1)
    op = (operation if kind == "segment" else training_operation)(job)
    assert op.done and op.error.code == code.value[0] and op.error.message
    info = _error_info(op.error)
    assert info.reason == reason and dict(info.metadata) == {"jobId": "j-1"}


def test_a_stream_that_fails_as_a_whole_carries_an_error_info(channel):
    segment_stream = channel.stream_stream("/segsvc.v1.SegmentationService/SegmentStream",
                                           request_serializer=lambda data: data,
                                           response_deserializer=pb.SegmentResponse.FromString)
    good = pb.SegmentRequest(model="tiny", image=encode(make_image(16, 16))).SerializeToString()

    def fetch_all(requests, timeout):
        return list(segment_stream(iter(requests), timeout=timeout))

    exc, status = _failed(fetch_all, [good, b"\xff\xff\xff"])
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _error_info(status).reason == "INVALID_ARGUMENT" and _kind(exc) == "InvalidArgument"


def test_errors_of_guarded_services_carry_an_error_info(start_server, tmp_path):
    server = start_server(tmp_path / "repo")  # datasets are off without a state dir
    with grpc.insecure_channel(server.address) as ch:
        exc, status = _failed(dpb_grpc.DatasetServiceStub(ch).ListDatasets, dpb.ListDatasetsRequest())
    info = _error_info(status)
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    # every error names a request id, here a generated one (it was left out on these services)
    assert info.reason == "FAILED_PRECONDITION"
    assert info.metadata["requestId"] == dict(exc.trailing_metadata())["x-request-id"] != ""
    assert error_from_rpc(exc).__class__ is errors.FailedPrecondition


def test_an_invalid_dataset_keeps_its_precondition_failure_next_to_the_error_info(start_server, tmp_path):
    (tmp_path / "data").mkdir()
    server = start_server(tmp_path / "repo", datasets=DatasetsConfig(tmp_path / "state", data_root=tmp_path / "data",
                                                                     limits=ExtractLimits()))
    folder = broken(tmp_path / "local" / "broken")
    data = tar_with([(member(p.relative_to(folder).as_posix()), p.read_bytes())
                     for p in sorted(folder.rglob("*")) if p.is_file()])
    messages = [dpb.UploadDatasetRequest(metadata=dpb.UploadDatasetMetadata(name="broken",
                                                                            format=dpb.UPLOAD_FORMAT_TAR)),
                dpb.UploadDatasetRequest(chunk=dpb.DatasetChunk(data=data))]
    with grpc.insecure_channel(server.address) as ch:
        exc, status = _failed(dpb_grpc.DatasetServiceStub(ch).UploadDataset, iter(messages))
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    failure = error_details_pb2.PreconditionFailure()
    assert len(status.details) == 2 and status.details[0].Unpack(failure)
    assert {v.subject for v in failure.violations} == {"images/lonely.png", "masks/b.png", "masks/orphan.png"}
    assert _error_info(status).reason == "DATASET_INVALID" and _kind(exc) == "DatasetInvalid"


def test_an_internal_error_has_an_error_info_and_leaks_nothing(start_server, tmp_path, monkeypatch):
    def broken_run(self, jobs):
        raise RuntimeError("secret detail in /srv/segsvc/private/weights.py line 42")

    monkeypatch.setattr(Engine, "run", broken_run)
    publish(tmp_path, "m", seed=5)
    server = start_server(tmp_path)
    with grpc.insecure_channel(server.address) as ch:
        exc, status = _failed(pb_grpc.SegmentationServiceStub(ch).Segment,
                              pb.SegmentRequest(model="m", image=encode(make_image(16, 16)), request_id="rid-77"))
    assert exc.code() == grpc.StatusCode.INTERNAL
    info = _error_info(status)
    assert info.reason == "INTERNAL" and dict(info.metadata) == {"requestId": "rid-77"}
    assert len(status.details) == 1
    assert status.message == "internal server error (request id rid-77); see the server log"
    trailers = b"".join(v if isinstance(v, bytes) else v.encode() for _, v in exc.trailing_metadata())
    for leak in (b"secret", b"/srv", b"weights.py", b"Traceback", b"RuntimeError", b"line 42"):
        assert leak not in trailers and leak.decode() not in exc.details()


def test_reasons_are_upper_snake_case_and_name_one_class_each():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SegsvcError)]
    reasons = {error_reason(c.__name__) for c in classes}
    assert len(reasons) == len(classes) and "INTERNAL" not in reasons
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]+[A-Z0-9]", r) and len(r) <= 63 for r in reasons)
    assert error_reason("ImageTooLarge") == "IMAGE_TOO_LARGE" and error_reason("") == "INTERNAL"


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailing: tuple, details: str = "what went wrong") -> None:
        self._code, self._trailing, self._details = code, trailing, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


def _details(reason: str, domain: str = ERROR_DOMAIN) -> tuple[str, bytes]:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=domain))
    return DETAILS_KEY, status_pb2.Status(code=5, message="what went wrong", details=[detail]).SerializeToString()


@pytest.mark.parametrize(
    "trailing, expected",
    [
        (((("segsvc-error", "UnknownModel"),) + (_details("UNKNOWN_VERSION"),)), errors.UnknownVersion),
        ((_details("UNKNOWN_VERSION"),), errors.UnknownVersion),  # a server that sends no segsvc-error
        ((("segsvc-error", "UnknownModel"),), errors.UnknownModel),  # an older server: no details
        ((("segsvc-error", "UnknownModel"), _details("UNKNOWN_VERSION", "example.com")), errors.UnknownModel),
        ((("segsvc-error", "UnknownModel"), _details("SOMETHING_NEWER")), errors.UnknownModel),
        ((("segsvc-error", "UnknownModel"), (DETAILS_KEY, b"\xff not a status")), errors.UnknownModel),
        ((_details("IMAGE_TOO_LARGE"),), errors.NotFound),  # a reason that does not fit the code
    ],
)
def test_the_client_prefers_the_error_info_and_falls_back_to_the_trailer(trailing, expected):
    error = error_from_rpc(_FakeRpcError(grpc.StatusCode.NOT_FOUND, trailing))
    assert type(error) is expected and str(error) == "what went wrong" and error.code == grpc.StatusCode.NOT_FOUND


def test_the_whole_status_of_a_long_problem_list_fits_the_budget():
    problems = tuple(("labels outside the classes", f"masks/{i:05d}.png", "values 7 outside the classes " * 3)
                     for i in range(1000))
    exc = errors.DatasetInvalid("x" * 1024, problems)
    data = status_details(exc, grpc.StatusCode.FAILED_PRECONDITION, "x" * 1024, request_id="r" * 128)
    assert len(data) <= MAX_DETAILS_BYTES
    status = status_pb2.Status.FromString(data)
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure) and _error_info(status).reason == "DATASET_INVALID"
    shown = failure.violations
    assert 10 < len(shown) < 1000 and shown[-1].type == "truncated"
    assert shown[-1].description.startswith(f"{1000 - (len(shown) - 1)} more problem(s)")


def test_auth_refusals_carry_an_error_info_too(start_server, tmp_path):
    """The interceptor's UNAUTHENTICATED / PERMISSION_DENIED go through the same table as every other error."""
    from segsvc.server.auth import AuthConfig

    publish(tmp_path / "repo", "m", seed=3)
    server = start_server(tmp_path / "repo", auth=AuthConfig.parse("infer-tok infer\n"))
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.SegmentationServiceStub(ch)
        exc, status = _failed(stub.ListModels, pb.ListModelsRequest())
        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and _kind(exc) == "Unauthenticated"
        assert _error_info(status).reason == "UNAUTHENTICATED"
        exc, status = _failed(stub.UnloadModel, pb.UnloadModelRequest(model="m"),
                              metadata=(("authorization", "Bearer infer-tok"),))
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED and "lacks the 'manage' scope" in exc.details()
        assert _error_info(status).reason == "PERMISSION_DENIED"


@pytest.mark.parametrize("method", ["/segsvc.v1.SegmentationService/Segment",
                                    "/inference.GRPCInferenceService/ModelInfer",
                                    "/inference.GRPCInferenceService/ModelMetadata"])
def test_undecodable_request_bytes_carry_an_error_info(channel, method):
    """The gate's parse errors (both protocols) go through the same table as every other error."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    exc, status = _failed(call, b"\x0a\xff\xff\xff\xff\x0f")
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.details() == f"the request is not a valid {method.rsplit('/', 1)[-1]} message"
    assert _error_info(status).reason == "INVALID_ARGUMENT" and _kind(exc) == "InvalidArgument"
    assert error_from_rpc(exc).__class__ is errors.InvalidArgument


def test_the_starting_gates_refusal_carries_an_error_info(held_start, tmp_path):
    """UNAVAILABLE while the server starts (or drains) reads like every other error, for any client."""
    publish(tmp_path / "repo", "m", seed=2)
    port, release = held_start(tmp_path / "repo")  # listening, its model load held: the gate refuses calls
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            exc, status = _failed(pb_grpc.SegmentationServiceStub(ch).ListModels, pb.ListModelsRequest())
    finally:
        release()
    assert exc.code() == grpc.StatusCode.UNAVAILABLE and "starting or draining" in exc.details()
    assert _error_info(status).reason == "UNAVAILABLE" and _kind(exc) == "Unavailable"
    assert error_from_rpc(exc).__class__ is errors.Unavailable


@pytest.mark.parametrize("cls", [c for c, _ in ERROR_CODES])
def test_every_kind_in_the_table_comes_back_as_itself(cls):
    """Each domain class a server sends is rebuilt as that class. ArtifactError and ExportError share
    FAILED_PRECONDITION with FailedPrecondition but do not derive from it: clients got FailedPrecondition."""
    code = dict(ERROR_CODES)[cls]
    exc = error_from_status(code, "what went wrong", cls.__name__)
    assert type(exc) is cls and exc.code == code
    assert type(error_from_status(code, "what went wrong", error_reason(cls.__name__))) is cls


@pytest.mark.parametrize("details, cls, whose", [
    ("CLIENT: Sent message larger than max (70000000 vs. 67108864)", errors.ImageTooLarge, "this client's limit"),
    ("SERVER: Received message larger than max (70000000 vs. 67108864)", errors.ImageTooLarge, "the server's limit"),
    ("CLIENT: Received message larger than max (70000000 vs. 67108864)", errors.ResponseTooLarge, "this client's"),
    ("SERVER: Sent message larger than max (70000000 vs. 67108864)", errors.ResponseTooLarge, "the server's limit"),
])
def test_grpcs_own_message_size_refusal_is_the_callers_to_change_not_overloaded(details, cls, whose):
    """gRPC refuses a message over either end's limit with RESOURCE_EXHAUSTED and no segsvc details: every
    client of the wire table (segment, jobs, datasets) read it as Overloaded, 'back off and retry', which never
    helps; a segsvc Overloaded (its trailer says so) stays Overloaded."""
    error = error_from_rpc(_FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, (), details))
    assert error.__class__ is cls and whose in str(error) and "70000000 bytes" in str(error)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    queue_full = _FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, ((ERROR_KIND_KEY, "Overloaded"),), details)
    assert error_from_rpc(queue_full).__class__ is errors.Overloaded
