"""Health transitions, graceful drain, auth, TLS, reflection and metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import os
import shutil
import subprocess
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from segsvc import errors
from segsvc.client import SegmentationClient
from segsvc.jobs.batch import LOCK_FILE, JobsConfig
from segsvc.jobs.trainspec import TrainingConfig
from segsvc.server.app import SEND_GRACE_S
from segsvc.server.auth import AuthConfig
from segsvc.server.config import TLSConfig
from tests.server.conftest import (
    RunningServer, assert_labels_match, make_image, metric, metrics_text, publish, reference, server_config, wait_for,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_is_not_serving_until_a_model_is_loaded(start_server, tmp_path):
    server = start_server(tmp_path)  # empty repository
    with server.client() as c:
        # health's own 5 s deadline is the client's default: a loaded host can take longer to answer
        assert c.health(timeout_s=60) == "NOT_SERVING"
        assert c.health("segsvc.v1.SegmentationService", timeout_s=60) == "NOT_SERVING"
        assert c.list_models() == []
        publish(tmp_path, "late", seed=1)
        info = c.load_model("late")
        assert info.ready and info.version == 1
        wait_for(lambda: c.health(timeout_s=60) == "SERVING")
        assert c.health("segsvc.v1.SegmentationService", timeout_s=60) == "SERVING"
        assert c.unload_model("late") == [1]
        wait_for(lambda: c.health(timeout_s=60) == "NOT_SERVING")
        with pytest.raises(errors.UnknownModel):
            c.segment(make_image(8, 8), model="late")


def test_sigterm_drain_flips_health_and_finishes_requests_in_flight(start_server, tmp_path, gated):
    publish(tmp_path, "m", seed=2)
    # A grace only a hang outlasts (the drain ends once the request in flight does): a stalled host can take
    # seconds between the stop and the gate's opening, and a request still running after the grace is cancelled.
    server = start_server(tmp_path, grace_s=120.0)
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        assert next(watch).status == SERVING
        outcome = {}

        def in_flight():
            with server.client() as c:
                outcome["result"] = c.segment(make_image(24, 24), model="m")

        t = threading.Thread(target=in_flight)
        t.start()
        wait_for(lambda: len(gated.ran) == 1)
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop)  # what SIGTERM runs
        assert next(watch).status == NOT_SERVING
        with server.client() as c, pytest.raises(errors.Unavailable):
            c.segment(make_image(8, 8), model="m", timeout_s=60)  # new work is refused (at once) while draining
        gated.gate.set()
        t.join(60)
        stopping.result(60)
    assert outcome["result"].mask.shape == (24, 24)  # the request in flight finished


def test_the_drain_gives_up_on_a_stuck_forward_pass_after_drain_timeout(tmp_path, gated, caplog):
    """SIGTERM with a forward pass that never ends: the server's stop waited for it for ever (``drain_timeout_s``
    bounded only the wait for requests to release their version, not the batch itself)."""
    publish(tmp_path, "m", seed=2)
    config = server_config(tmp_path)
    server = RunningServer(replace(config, manager=replace(config.manager, drain_timeout_s=0.5)))
    errors_seen: list[BaseException] = []

    def in_flight() -> None:
        with server.client() as c:
            try:
                c.segment(make_image(24, 24), model="m", timeout_s=120)
            except errors.SegsvcError as exc:  # the stop cancels it
                errors_seen.append(exc)

    t = threading.Thread(target=in_flight)
    try:
        t.start()
        wait_for(lambda: len(gated.ran) == 1)  # its forward pass runs, and will not end
        with caplog.at_level(logging.ERROR, logger="segsvc.inference.manager"):
            server.call(server.server.stop(0.0), timeout=120)  # only a hang reaches the timeout
        assert server.server.abandoned == ["m:1"]
        assert any("still busy after drain_timeout_s=0.5 s" in r.getMessage() and "m:1" in r.getMessage()
                   for r in caplog.records)
    finally:
        gated.gate.set()
        t.join(60)
        server.close()
    assert len(errors_seen) == 1 and not t.is_alive()


def test_a_stop_step_that_fails_does_not_skip_the_steps_after_it(tmp_path, monkeypatch):
    """A step of the stop that raised (here the trainers' stop) ended the stop there: the state folder's lock stayed
    held (a server started next on it failed), the models were never drained, and a second ``stop`` (as
    ``wait_stopped``) waited for ever. Every step now runs; the first failure is raised at the end."""
    publish(tmp_path / "repo", "m", seed=2)
    state = tmp_path / "state"
    jobs = JobsConfig(state_dir=state, output_root=tmp_path / "out")
    server = RunningServer(server_config(tmp_path / "repo", jobs=jobs, training=TrainingConfig(state_dir=state)))
    try:
        async def broken() -> None:
            raise RuntimeError("the trainer did not stop")

        monkeypatch.setattr(server.server.training, "stop", broken)
        with pytest.raises(RuntimeError, match="the trainer did not stop"):
            server.call(server.server.stop(0.0), timeout=120)  # only a hang reaches the timeouts
        fd = os.open(state / LOCK_FILE, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: the next server may take the folder
        finally:
            os.close(fd)
        assert server.manager.loaded() == []
        server.call(server.server.wait_stopped(), timeout=120)
    finally:
        server.close()


def test_a_stop_while_the_server_starts_ends_the_start_first(tmp_path, monkeypatch):
    """``stop`` during ``start`` ran its steps beside the start's: the start then went on over a stopped server
    (it set health SERVING and opened the drain gate, with the jobs stopped and the port closed)."""
    from segsvc.jobs.batch import JobRunner

    publish(tmp_path / "repo", "m", seed=2)
    entered, release = threading.Event(), threading.Event()
    original = JobRunner.start

    async def held(self) -> None:
        entered.set()
        await asyncio.to_thread(release.wait, 120)  # only a hang reaches the timeout
        await original(self)

    monkeypatch.setattr(JobRunner, "start", held)
    jobs = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out")
    config = server_config(tmp_path / "repo", jobs=jobs)
    server = RunningServer.__new__(RunningServer)  # its loop, without its blocking start
    server.loop = asyncio.new_event_loop()
    server.thread = threading.Thread(target=server.loop.run_forever, daemon=True)
    server.thread.start()
    try:
        server.server = server.call(RunningServer._create(config))
        starting = asyncio.run_coroutine_threadsafe(server.server.start(), server.loop)
        assert entered.wait(120)
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(0.0), server.loop)
        release.set()
        stopping.result(120)
        with pytest.raises(concurrent.futures.CancelledError):  # the start was interrupted
            starting.result(120)
        assert not server.server.gate.accepting
        assert server.call(server.server.health.Check(health_pb2.HealthCheckRequest(service=""), None)).status \
            == NOT_SERVING
    finally:
        release.set()
        server.close()


def test_bearer_token_auth(start_server, tmp_path):
    publish(tmp_path, "m", seed=3)
    server = start_server(tmp_path, auth=AuthConfig.single("s3cret-token"))
    image = make_image(16, 16)
    with server.client() as anonymous:
        assert anonymous.health(timeout_s=60) == "SERVING"  # health stays open
        with pytest.raises(errors.Unauthenticated, match="missing bearer token"):
            anonymous.segment(image, model="m")
        with pytest.raises(errors.Unauthenticated):
            anonymous.segment_many([image], model="m", progress=False)
        with pytest.raises(errors.Unauthenticated):
            anonymous.list_models()
    with server.client(token="wrong") as wrong, pytest.raises(errors.Unauthenticated, match="wrong bearer token"):
        wrong.segment(image, model="m")
    with server.client(token="s3cret-token") as ok:
        assert ok.segment(image, model="m").mask.shape == (16, 16)
        assert [r.mask.shape for r in ok.segment_many([image, image], model="m", progress=False)] == [(16, 16)] * 2
        assert [m.name for m in ok.list_models()] == ["m"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl absent: cannot make a test certificate")
def test_tls(start_server, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    repo = tmp_path / "repo"
    v1 = publish(repo, "m", seed=4)
    server = start_server(repo, tls=TLSConfig(cert, key), auth=AuthConfig.single("tok"))
    image = make_image(20, 28)
    with SegmentationClient(server.address, token="tok", root_certificates=cert.read_bytes()) as c:
        assert_labels_match(c.segment(image).mask, reference(v1), image)
    with SegmentationClient(server.address, token="tok", timeout_s=3) as plaintext, pytest.raises(errors.SegsvcError):
        plaintext.segment(image)


def test_tls_files_that_are_no_certificate_and_key_pair_are_named(tmp_path):
    """They were reported as 'cannot listen on ...: Failed to bind', which sends operators to the port."""
    def pair(name: str) -> tuple[Path, Path]:
        key, cert = tmp_path / f"{name}-key.pem", tmp_path / f"{name}-cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
        return key, cert

    (key_a, cert_a), (key_b, _) = pair("a"), pair("b")
    assert TLSConfig(cert_a, key_a).read() == (key_a.read_bytes(), cert_a.read_bytes())
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for cert, key in ((cert_a, key_b), (garbage, key_a)):
        with pytest.raises(errors.InvalidArgument, match="are not a PEM certificate chain and its private key"):
            TLSConfig(cert, key).read()


def test_the_transport_may_still_send_responses_when_the_drain_stops_it(start_server, tmp_path, monkeypatch):
    """A handler that has returned may still be sending its response: stop(0) cancelled such sends (a large
    label map in flight at SIGTERM came back UNAVAILABLE, though counted OK)."""
    publish(tmp_path, "m", seed=3)
    server = start_server(tmp_path, grace_s=10.0)
    graces = []
    real_stop = server.server._server.stop

    async def stop(grace):
        graces.append(grace)
        return await real_stop(grace)

    monkeypatch.setattr(server.server._server, "stop", stop)
    asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop).result(30)
    assert len(graces) == 1 and 0 < graces[0] <= SEND_GRACE_S


def test_reflection_lists_the_services(shared_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(shared_server.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"segsvc.v1.SegmentationService", "grpc.health.v1.Health"} <= services


def test_metrics_endpoint_serves_the_counters(shared_server, client):
    client.segment(make_image(16, 16), model="tiny")
    client.segment(make_image(16, 16), model="tiny")
    with pytest.raises(errors.InvalidImage):
        client.segment(b"not an image", model="tiny")
    text = metrics_text(shared_server)
    assert metric(text, "segsvc_requests_total", method="Segment", model="tiny", code="OK") >= 2
    assert metric(text, "segsvc_requests_total", method="Segment", model="tiny", code="INVALID_ARGUMENT") >= 1
    assert metric(text, "segsvc_request_seconds_count", method="Segment", model="tiny") >= 3
    assert metric(text, "segsvc_queue_seconds_count", model="tiny") >= 2
    assert metric(text, "segsvc_inference_seconds_count", model="tiny") >= 2
    assert metric(text, "segsvc_batch_size_count", model="tiny") >= 1
    assert metric(text, "segsvc_queue_depth", model="tiny", version="2") == 0
    assert metric(text, "segsvc_model_loaded", model="tiny", version="2", default="true") == 1
    assert metric(text, "segsvc_loaded_models") == 3


def test_default_version_pinning_and_explicit_loads(start_server, tmp_path):
    v1 = publish(tmp_path, "m", seed=5)
    v2 = publish(tmp_path, "m", seed=6)
    server = start_server(tmp_path)
    image = make_image(40, 40, seed=1)
    with server.client() as c:
        assert c.segment(image, model="m").version == 2
        info = c.load_model("m", 1)  # by number: kept next to the automatic version 2
        assert list(info.loaded_versions) == [1, 2] and info.default_version == 2
        pinned = c.set_default_version("m", 1)
        assert pinned.default_version == 1 and pinned.default_pinned
        assert (tmp_path / "m" / "DEFAULT").read_text() == "1\n"  # persistent, as a promotion writes it
        with pytest.raises(errors.FailedPrecondition, match="SetDefaultVersion to another first"):
            c.unload_model("m", 1)  # would send requests without a version to version 2
        r = c.segment(image, model="m")
        assert r.version == 1
        assert_labels_match(r.mask, reference(v1), image)
        assert c.segment(image, model="m", version=2).version == 2
        assert c.set_default_version("m", 0).default_version == 2  # unpinned: newest again
        assert not (tmp_path / "m" / "DEFAULT").exists()
        assert_labels_match(c.segment(image, model="m").mask, reference(v2), image)
        assert c.unload_model("m", 1) == [1]
        assert list(c.get_model("m").loaded_versions) == [2]
