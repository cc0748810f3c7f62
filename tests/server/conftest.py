"""A real server on 127.0.0.1:0, in-process, with tiny models saved into tmp_path.

The server runs its own asyncio loop on a background thread; tests talk to it
with the real synchronous client, exactly like a remote caller would.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import cv2
import numpy as np
import pytest
import torch

import segsvc.server.app
from segsvc.client import SegmentationClient
from segsvc.config import ModelSpec
from segsvc.inference.batcher import BatchingConfig
from segsvc.inference.engine import Engine, EngineConfig
from segsvc.inference.manager import ManagerConfig
from segsvc.inference.predictor import Predictor
from segsvc.models.artifact import load_artifact, save_artifact
from segsvc.models.registry import build_model
from segsvc.server.app import SegmentationServer
from segsvc.server.config import LimitsConfig, ServerConfig
from tests.conftest import assert_labels_agree

TINY = {"base_channels": 4, "depth": 2}


def tiny_model(seed: int, num_classes: int = 3, in_channels: int = 3) -> tuple[ModelSpec, torch.nn.Module]:
    """A tiny U-Net whose BatchNorm statistics are calibrated on noise, so its label maps vary.

    (Freshly initialised BatchNorm makes every pixel the same class, which would make
    "equals the in-process prediction" true for the wrong reason.)
    """
    spec = ModelSpec("unet", num_classes, in_channels, params=TINY)
    torch.manual_seed(seed)
    model = build_model(spec)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, in_channels, 64, 64, generator=g))
    return spec, model.eval()


def publish(root: Path, name: str, seed: int, num_classes: int = 3, in_channels: int = 3,
            version: int | None = None) -> Path:
    spec, model = tiny_model(seed, num_classes, in_channels)
    return save_artifact(model, root, name, spec=spec, version=version,
                         class_names=[f"c{i}" for i in range(num_classes)])


def reference(version_dir: Path) -> Predictor:
    model, manifest = load_artifact(version_dir)
    return Predictor(model, manifest)


def make_image(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """Smooth random shapes (so JPEG and PNG behave like on photos), uint8 RGB or grey."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), channels), dtype=np.uint8)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    image = image.reshape(h, w, channels)
    return image[:, :, 0] if channels == 1 else image


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    bgr = image if image.ndim == 2 else image[:, :, ::-1]
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(bgr))
    assert ok
    return buf.tobytes()


def assert_labels_match(labels: np.ndarray, predictor: Predictor, image: np.ndarray, logits_fn=None) -> None:
    """Server labels == in-process labels. Batched and single forward passes may differ in the last
    float bit, so only pixels whose top-2 logits are numerically tied (gap < 1e-4) may differ."""
    with torch.inference_mode():
        if logits_fn is None:  # what predictor.predict(image) computes: the manifest's contract at the image's size
            logits = predictor.image_logits(image)[0]
        else:
            logits = logits_fn(predictor.input_tensor(image)[None])[0]
    assert_labels_agree(labels, logits, dim=0)


class RunningServer:
    """A SegmentationServer on its own event-loop thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.server: SegmentationServer = self.call(self._create(config))
        try:
            self.call(self.server.start(), timeout=600)  # loads every model: slow on a busy host, only a hang trips it
        except BaseException:
            self.close()
            raise

    @staticmethod
    async def _create(config: ServerConfig) -> SegmentationServer:
        return SegmentationServer(config)

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def manager(self):
        return self.server.manager

    def client(self, **kwargs) -> SegmentationClient:
        return SegmentationClient(self.address, **kwargs)

    def stop(self, grace_s: float = 0.0) -> None:
        if not self.loop.is_closed():
            self.call(self.server.stop(grace_s))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(120)  # a loaded host may take seconds to end the loop thread: only a hang nears this
            self.loop.close()


def server_config(repo: Path, **overrides) -> ServerConfig:
    """Test defaults: local only, any free ports, no warm-up, short batching delay, 1 torch thread."""
    manager = ManagerConfig(
        engine=EngineConfig(device="cpu", warmup=False),
        batching=BatchingConfig(max_batch_size=8, max_delay_s=0.005, max_queue_size=64),
    )
    base = ServerConfig(model_repo=repo, host="127.0.0.1", port=0, metrics_port=0, manager=manager,
                        limits=LimitsConfig(), grace_s=0.0, io_threads=2, torch_threads=1)
    manager_fields = {k: overrides.pop(k) for k in list(overrides) if k in ("batching", "engine", "poll_interval_s", "models")}
    if manager_fields:
        base = replace(base, manager=replace(manager, **manager_fields))
    return replace(base, **overrides)


@pytest.fixture
def start_server():
    """Factory: ``start_server(repo, **config overrides)``; every server is stopped at the end."""
    servers: list[RunningServer] = []

    def start(repo: Path, **overrides) -> RunningServer:
        server = RunningServer(server_config(repo, **overrides))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory) -> Path:
    """``tiny`` (RGB, 3 classes, versions 1 and 2), ``grey`` (1 channel, 2 classes), ``wide`` (300 classes)."""
    root = tmp_path_factory.mktemp("repo")
    publish(root, "tiny", seed=1)
    publish(root, "tiny", seed=2)
    publish(root, "grey", seed=3, num_classes=2, in_channels=1)
    publish(root, "wide", seed=4, num_classes=300)
    return root


@pytest.fixture(scope="module")
def shared_server(shared_repo):
    """One server for the read-only tests of a module (max message 4 MiB to test the limit cheaply)."""
    server = RunningServer(server_config(shared_repo, limits=LimitsConfig(max_message_bytes=4 << 20)))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(shared_server):
    with shared_server.client(timeout_s=120) as c:  # a deadline only a hang reaches (a loaded host takes seconds)
        yield c


@pytest.fixture(scope="module")
def triton_client(shared_server):
    """The official tritonclient gRPC client of the shared server (Open Inference Protocol tests)."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(shared_server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tiny_ref(shared_repo) -> Predictor:
    """The in-process predictor of tiny's default (newest) version."""
    return reference(shared_repo / "tiny" / "2")


@pytest.fixture
def gated(monkeypatch):
    """Engine.run waits for ``gate`` and records the image sizes of every batch it runs."""
    state = SimpleNamespace(gate=threading.Event(), ran=[])
    original = Engine.run

    def run(self, jobs):
        state.ran.append([j.size for j in jobs])
        state.gate.wait(300)  # the test opens it (teardown too): a batch let go early would race the test's checks
        return original(self, jobs)

    monkeypatch.setattr(Engine, "run", run)
    yield state
    state.gate.set()


def wait_for(condition, timeout_s: float = 60.0) -> None:
    """Poll ``condition`` until it holds. The generous timeout only matters when a test is failing:
    on a loaded 2-core machine a server thread can be starved for seconds, so no tight limits here."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


QUEUED_DEADLINE_S = 5.0  # long enough to reach the queue on a loaded host; a test waits this long
LAST_DEADLINE_S = 40.0  # the longest deadline a retry gives: a request still not queued by then is a hang


def expire_in_queue(batcher, send: Callable[[float], object],  # type: ignore[no-untyped-def]
                    ) -> tuple[BaseException, int]:
    """Call ``send(deadline_s)`` (a request with that deadline), wait until its request is queued behind the held
    batch, and return what the call raised once its deadline passed, and how many calls were made. A deadline of a
    few tenths of a second could pass before the request even reaches the server on a loaded host, and it would
    then never be queued; a stalled host can hold it past ``QUEUED_DEADLINE_S`` too, so a call whose deadline
    passed before it was queued is made again with twice the deadline (the server counts those it received)."""
    depth = batcher.queue_depth
    deadline_s, calls = QUEUED_DEADLINE_S, 0
    with ThreadPoolExecutor(1) as pool:
        while True:
            call = pool.submit(send, deadline_s)
            calls += 1
            wait_for(lambda call=call: batcher.queue_depth > depth or call.done(), timeout_s=deadline_s + 60)
            if batcher.queue_depth > depth:
                break
            assert deadline_s < LAST_DEADLINE_S, "the request did not reach the queue before its deadline"
            deadline_s *= 2
        error = call.exception(deadline_s + 60)
    assert error is not None, "the call succeeded"
    return error, calls


def metrics_text(server: RunningServer) -> str:
    """The server's Prometheus metrics page."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    return urllib.request.urlopen(url, timeout=30).read().decode()


def metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The sample ``name`` with ``labels`` in a Prometheus text page; ``default`` when there is none."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"no sample {name}{labels} in the metrics")


def free_port() -> int:
    """A local TCP port nothing listens on now. Another process may take it before the test binds it: prefer
    ``port=0`` (the server picks and reports its port), or ``reserved_port`` where the port must be known first."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def reserved_port():
    """A local TCP port held for the test: bound here but not listening, so connecting to it is refused and no
    other process can take it (nor the test's own server: ``release()`` frees it just before the server binds it,
    which narrows the window where another process could take it to the next line of the test).

    Yields ``(port, release)``; the port is freed at the end in any case."""
    import socket

    s = socket.socket()  # no SO_REUSEADDR: another socket cannot bind the port while this one holds it
    try:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1], s.close
    finally:
        s.close()


@pytest.fixture
def held_start(start_server, monkeypatch):
    """Factory: ``held_start(repo) -> (port, release)`` starts a server on a thread and returns once it
    listens with its first model load held (its gate refuses calls: "starting"); ``release()`` lets the
    load finish and waits for the start to complete. Released at teardown in any case."""
    from segsvc.inference.loader import VersionLoader

    loading, go = threading.Event(), threading.Event()
    build = VersionLoader._build_engine
    starters: list[threading.Thread] = []

    def slow_build(self, name, version):  # type: ignore[no-untyped-def]
        loading.set()
        assert go.wait(120), "the test never released the model load"
        return build(self, name, version)

    monkeypatch.setattr(VersionLoader, "_build_engine", slow_build)
    # The server binds port 0 and listens before it loads its models: its port is known once the load is held
    # (a port picked here and bound later could be taken by another process in between).
    started: list[SegmentationServer] = []
    real_start = SegmentationServer.start

    async def recording_start(self):  # type: ignore[no-untyped-def]
        started.append(self)
        await real_start(self)

    monkeypatch.setattr(SegmentationServer, "start", recording_start)

    def release() -> None:
        go.set()
        for thread in starters:
            thread.join(150)

    def start(repo: Path) -> tuple[int, Callable[[], None]]:
        starter = threading.Thread(target=lambda: start_server(repo))
        starters.append(starter)
        starter.start()
        assert loading.wait(120), "the server never began loading its models"
        assert started[-1].port, "the server loads its models before it listens"
        return started[-1].port, release

    yield start
    release()


