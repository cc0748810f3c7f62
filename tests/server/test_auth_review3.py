"""Authentication fails closed, keeps its tokens out of reprs and logs, rotates them without a restart; the drain
refuses a call before its message, as the token check does."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
from pathlib import Path

import grpc
import pytest

from segsvc import errors
from segsvc.server.auth import SCOPES, AuthConfig, BearerTokenInterceptor, caller_may
from tests.server.conftest import publish

# A deadline far longer than a refusal takes: a call that waited for its message got DEADLINE_EXCEEDED instead.
TIMEOUT_S = 30
RAW = dict(request_serializer=None, response_deserializer=None)
PROBE = "/segsvc.v1.JobService/Probe"  # a 'jobs' method: what the scope check lets through is visible


async def _probe(server_interceptors: list, metadata: tuple = ()) -> tuple[grpc.StatusCode, bytes]:
    """Serve ``PROBE`` (it answers the scopes ``caller_may`` grants) behind the interceptors; call it once."""
    async def may(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return ",".join(s for s in SCOPES if caller_may(s)).encode()

    server = grpc.aio.server(interceptors=server_interceptors)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "segsvc.v1.JobService", {"Probe": grpc.unary_unary_rpc_method_handler(may)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                answer = await channel.unary_unary(PROBE, **RAW)(b"", metadata=metadata, timeout=TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), b""
            return grpc.StatusCode.OK, answer
    finally:
        await server.stop(None)


# -- the caller's scopes: none outside a call --------------------------------------------------------------------------

def test_code_outside_any_call_is_granted_no_scope():
    """A background task or a handler reached without the interceptor has no token: it may nothing (it was
    granted every scope, as if the server checked no token)."""
    assert [contextvars.Context().run(caller_may, s) for s in SCOPES] == [False] * len(SCOPES)


def test_only_a_server_without_tokens_grants_every_scope_and_a_token_its_own():
    from segsvc.server.auth import auth_interceptors

    assert asyncio.run(_probe(auth_interceptors(None))) == (grpc.StatusCode.OK, b"infer,jobs,manage")
    tokens = AuthConfig.parse("jobs-tok jobs\nadmin-tok manage\n")
    assert asyncio.run(_probe(auth_interceptors(tokens), (("authorization", "Bearer jobs-tok"),))) == \
        (grpc.StatusCode.OK, b"jobs")
    assert asyncio.run(_probe(auth_interceptors(tokens), (("authorization", "Bearer admin-tok"),))) == \
        (grpc.StatusCode.OK, b"infer,jobs,manage")
    assert asyncio.run(_probe(auth_interceptors(tokens)))[0] == grpc.StatusCode.UNAUTHENTICATED


def test_a_server_without_tokens_still_shows_training_jobs_to_its_callers(start_server, tmp_path):
    """The server itself says it checks no token (``auth_interceptors(None)``, app.py): its callers read
    training jobs as before, while code outside any call is granted nothing."""
    import uuid

    from google.longrunning import operations_pb2, operations_pb2_grpc

    from segsvc.jobs.batch import JobsConfig

    publish(tmp_path / "repo", "m", seed=3)
    (tmp_path / "data").mkdir()
    server = start_server(tmp_path / "repo", jobs=JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out",
                                                            data_root=tmp_path / "data"))
    job_id = uuid.uuid4().hex  # stored directly: no training runner here, so it stays queued
    server.server.jobs.store.submit("train", {"run_dir": "r/run", "model_name": "m", "request": {},
                                              "recipe_name": "r", "dataset": {"name": "d", "sha256": "ab"}}, [],
                                    job_id=job_id)
    with grpc.insecure_channel(server.address) as channel:
        ops = operations_pb2_grpc.OperationsStub(channel)
        op = ops.GetOperation(operations_pb2.GetOperationRequest(name=f"jobs/{job_id}"), timeout=TIMEOUT_S)
        listed = ops.ListOperations(operations_pb2.ListOperationsRequest(), timeout=TIMEOUT_S)
    assert op.name == f"jobs/{job_id}" and not op.done
    assert [o.name for o in listed.operations] == [f"jobs/{job_id}"]


# -- reprs -------------------------------------------------------------------------------------------------------------

def test_the_auth_config_repr_shows_the_count_and_scopes_not_the_tokens():
    auth = AuthConfig.parse("Xk9pQ2vL7zR infer\nAdm1nT0k3n manage\nJ0bsT0k jobs,infer\n")
    for text in (repr(auth), str(auth), f"{auth}", repr((auth,))):
        assert "Xk9pQ2vL7zR" not in text and "Adm1nT0k3n" not in text and "J0bsT0k" not in text, text
        assert "3 tokens" in text and "infer, jobs, manage" in text, text


# -- the file format ---------------------------------------------------------------------------------------------------

def test_a_token_and_its_scopes_may_be_separated_by_a_tab():
    """Any blank separates them (a tab made the whole line one token, refused as holding whitespace)."""
    auth = AuthConfig.parse("tab-tok\tmanage\nboth-tok \t infer,\tjobs\n")
    assert auth.scopes_of("tab-tok") == {"manage"} and auth.scopes_of("both-tok") == {"infer", "jobs"}


def test_an_unknown_scope_is_named_only_when_it_looks_like_a_scope_name():
    """A misspelt scope is named; a value that looks like a token (two tokens on one line) is not: the message
    goes to the server's log when a rewritten token file is refused."""
    with pytest.raises(errors.InvalidArgument, match=r"line 2: unknown token scope\(s\) 'mange'"):
        AuthConfig.parse("a infer\nb mange\n")
    with pytest.raises(errors.InvalidArgument, match="line 1: unknown token scope") as info:
        AuthConfig.parse("new-tok old-tok-R4nd0mQ,jobs\n")
    assert "R4nd0mQ" not in str(info.value) and "1 value that is no scope name" in str(info.value)


def test_a_token_listed_twice_is_refused_without_naming_it():
    """Twice with different scopes, the last line silently won: a token 'downgraded' on an early line kept
    'manage' from a later one."""
    with pytest.raises(errors.InvalidArgument, match="line 3: the token of line 1 again") as info:
        AuthConfig.parse("dup-tok infer\nother-tok jobs\ndup-tok manage\n")
    assert "dup-tok" not in str(info.value)


# -- rotation ----------------------------------------------------------------------------------------------------------

def _write(path: Path, text: str) -> None:
    """Replace the file as a Kubernetes Secret update or an editor does: a new file renamed over the old one."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def test_a_rewritten_token_file_is_read_again_and_its_tokens_replace_the_old_ones(tmp_path):
    from segsvc.server.auth import TokenFile

    path = tmp_path / "tokens.txt"
    path.write_text("old-tok infer\n")
    tokens = TokenFile.of(AuthConfig.from_file(path))
    assert tokens is not None and tokens.current.scopes_of("old-tok") == {"infer"}
    assert TokenFile.of(AuthConfig.parse("env-tok infer\n")) is None  # not from a file: nothing to re-read
    _write(path, "new-token-rotated infer,jobs\n")
    assert tokens.check()
    assert tokens.current.scopes_of("new-token-rotated") == {"infer", "jobs"}
    assert tokens.current.scopes_of("old-tok") is None
    assert not tokens.check()  # unchanged since: not read again


@pytest.mark.parametrize("bad", ["", "# all tokens removed\n", "new-tok infer\nroot-tok root\n", b"\xff\xfe tok\n",
                                 None, "new-tok old-tok-R4nd0mQ\n"])  # last: two tokens on one line
def test_an_invalid_or_missing_token_file_keeps_the_tokens_in_use(tmp_path, caplog, bad):
    from segsvc.server.auth import TokenFile

    path = tmp_path / "tokens.txt"
    path.write_text("kept-tok infer\n")
    tokens = TokenFile.of(AuthConfig.from_file(path))
    if bad is None:
        path.unlink()
    elif isinstance(bad, bytes):
        path.write_bytes(bad)
    else:
        _write(path, bad)
    with caplog.at_level(logging.WARNING, logger="segsvc.server.auth"):
        assert not tokens.reload()
        assert not tokens.check()  # the same bad file: not read (nor logged) again at every check
    assert tokens.current.scopes_of("kept-tok") == {"infer"} and tokens.current.scopes_of("new-tok") is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING], caplog.text
    assert "keeping the 1 token" in caplog.text and "kept-tok" not in caplog.text and "new-tok" not in caplog.text
    assert "R4nd0mQ" not in caplog.text  # a token read as a scope is not named either
    _write(path, "fixed-tok manage\n")  # fixed: taken at the next check
    assert tokens.check() and tokens.current.scopes_of("fixed-tok") == {"manage"}


def test_a_token_file_that_is_no_text_is_an_invalid_argument(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_bytes(b"\xff\xfe tok\n")
    with pytest.raises(errors.InvalidArgument, match="token file"):
        AuthConfig.from_file(path)


def test_the_interceptor_checks_each_call_against_the_tokens_the_watch_read_last(tmp_path):
    """Rotation end to end at the auth level: ``watch`` re-reads the rewritten file (its first look reads it
    once), ``reload_soon`` (SIGHUP) forces a read, and the interceptor answers with the newest set."""
    from segsvc.server.auth import TokenFile

    path = tmp_path / "tokens.txt"
    path.write_text("old-tok jobs\n")

    async def main() -> list[tuple[grpc.StatusCode, bytes]]:
        reads: asyncio.Queue[bool] = asyncio.Queue()
        tokens = TokenFile.of(AuthConfig.from_file(path), on_reload=reads.put_nowait)
        interceptor = BearerTokenInterceptor(tokens)
        watch = asyncio.create_task(tokens.watch(interval_s=0.05))
        try:
            assert await asyncio.wait_for(reads.get(), TIMEOUT_S)  # the first look
            seen = [await _probe([interceptor], (("authorization", "Bearer old-tok"),))]
            _write(path, "rotated-token jobs\n")
            assert await asyncio.wait_for(reads.get(), TIMEOUT_S)
            seen.append(await _probe([interceptor], (("authorization", "Bearer old-tok"),)))
            seen.append(await _probe([interceptor], (("authorization", "Bearer rotated-token"),)))
            _write(path, "")  # emptied: the rotated token stays
            assert not await asyncio.wait_for(reads.get(), TIMEOUT_S)
            seen.append(await _probe([interceptor], (("authorization", "Bearer rotated-token"),)))
            tokens.reload_soon()  # SIGHUP: read even though nothing changed since
            assert not await asyncio.wait_for(reads.get(), TIMEOUT_S)
            assert not watch.done()  # failed reads end nothing
            return seen
        finally:
            watch.cancel()

    assert asyncio.run(main()) == [(grpc.StatusCode.OK, b"jobs"), (grpc.StatusCode.UNAUTHENTICATED, b""),
                                   (grpc.StatusCode.OK, b"jobs"), (grpc.StatusCode.OK, b"jobs")]


# -- the drain refuses before the message ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drained(tmp_path_factory):
    """A server with tokens whose gate refuses new calls, as while it drains."""
    from tests.server.conftest import RunningServer, server_config

    repo = tmp_path_factory.mktemp("repo")
    publish(repo, "m", seed=3)
    server = RunningServer(server_config(repo, auth=AuthConfig.parse("admin-tok manage\n")))

    async def close_gate() -> None:
        server.server.gate.accepting = False

    try:
        server.call(close_gate())
        with grpc.insecure_channel(server.address) as channel:
            yield channel
    finally:
        server.close()


def _held_open(released: threading.Event):
    """A request stream that sends nothing until ``released`` (after the call's deadline)."""
    released.wait(4 * TIMEOUT_S)
    yield from ()


@pytest.mark.parametrize("method, shape", [
    ("/segsvc.v1.SegmentationService/ListModels", "stream_unary"),  # unary request, unary response
    ("/segsvc.v1.SegmentationService/Segment", "stream_stream"),
    ("/segsvc.v1.JobService/FetchJobOutputs", "stream_stream"),  # unary request, streamed response
    ("/inference.GRPCInferenceService/ModelInfer", "stream_unary"),
    ("/segsvc.v1.JobService/UploadImages", "stream_unary"),  # request stream: was refused before reading already
])
def test_the_drain_refuses_a_call_before_its_message_arrives(drained, method, shape):
    released = threading.Event()
    call = getattr(drained, shape)(method, **RAW)
    try:
        with pytest.raises(grpc.RpcError) as info:
            answer = call(_held_open(released), timeout=TIMEOUT_S, metadata=(("authorization", "Bearer admin-tok"),))
            if shape == "stream_stream":
                list(answer)
    finally:
        released.set()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (method, info.value.details())
    assert "starting or draining" in info.value.details()
    assert dict(info.value.trailing_metadata())["segsvc-error"] == "Unavailable"


def test_while_draining_a_caller_without_a_token_still_reads_unauthenticated(drained):
    call = drained.unary_unary("/segsvc.v1.SegmentationService/ListModels", **RAW)
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_failing_reload_callback_does_not_end_the_watch(tmp_path):
    """``watch`` "never raises", but an exception from its ``on_reload`` callback ended it: the file was then
    never read again, so a later rotation was ignored until a restart."""
    from segsvc.server.auth import TokenFile

    path = tmp_path / "tokens.txt"
    path.write_text("old-tok jobs\n")

    async def main() -> bool:
        calls: asyncio.Queue[bool] = asyncio.Queue()

        def on_reload(taken: bool) -> None:
            calls.put_nowait(taken)
            if calls.qsize() == 1:
                raise RuntimeError("a metrics hook broke")

        tokens = TokenFile.of(AuthConfig.from_file(path), on_reload=on_reload)
        watch = asyncio.create_task(tokens.watch(interval_s=0.05))
        try:
            await asyncio.wait_for(calls.get(), TIMEOUT_S)  # the first look; its callback raised
            tokens.reload_soon()
            await asyncio.wait_for(calls.get(), TIMEOUT_S)  # read again: the watch lives on
            return not watch.done()
        finally:
            watch.cancel()

    assert asyncio.run(main())
