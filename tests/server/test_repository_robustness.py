"""The server on a repository that is not tidy: it starts, serves what loads, and says what does not.

Covers a Kubernetes PV root (``lost+found``), stray files and symlinks, a corrupt newest
version at restart, a version copied manifest first, a version symlinked out of the root
and a manifest that names another version; failures show in GetModel/ListModels, in
``segsvc_model_version_failed`` and in the per-model health service.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from segsvc import errors
from segsvc.models.artifact import MANIFEST_FILE, WEIGHTS_FILE
from segsvc.v1 import segmentation_pb2 as pb
from tests.server.conftest import make_image, metric, metrics_text, publish, wait_for

READY, FAILED = pb.VERSION_STATE_READY, pb.VERSION_STATE_FAILED
HEALTH_S = 60  # health's deadline (the client's default is 5 s, which a loaded host can take to answer)


def states(info: pb.ModelInfo) -> dict[int, tuple[int, str]]:
    return {s.version: (s.state, s.reason) for s in info.version_status}


def assert_no_server_path(text: str, tmp_path: Path) -> None:
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text, text


def test_lost_found_stray_symlink_and_files_in_the_root_do_not_stop_the_server(start_server, tmp_path):
    repo = tmp_path / "repo"
    publish(repo, "good", seed=1)
    (repo / "lost+found").mkdir()  # on every ext4 volume
    (repo / "stray").symlink_to(tmp_path / "gone")  # points outside, to nothing
    (repo / "notes.txt").write_text("hello")
    server = start_server(repo)
    with server.client() as c:
        assert c.health(timeout_s=HEALTH_S) == "SERVING"
        assert c.segment(make_image(16, 16), model="good").version == 1
        assert [m.name for m in c.list_models()] == ["good"]
        wait_for(lambda: c.health("segsvc.model.good", timeout_s=HEALTH_S) == "SERVING")
    skipped = {s.path for s in server.manager.repository.skipped}
    assert skipped == {"lost+found", "stray", "notes.txt"}


def test_a_corrupt_newest_version_falls_back_at_restart_and_is_reported(start_server, tmp_path):
    repo = tmp_path / "repo"
    publish(repo, "m", seed=2)
    v2 = publish(repo, "m", seed=3)
    first = start_server(repo)
    with first.client() as c:
        assert c.segment(make_image(16, 16), model="m").version == 2
    first.close()
    (v2 / WEIGHTS_FILE).write_bytes(b"not safetensors")  # bad bytes, manifest intact

    server = start_server(repo)
    with server.client() as c:
        assert c.segment(make_image(16, 16), model="m").version == 1
        info = c.get_model("m")
        assert info.version == 1 and list(info.loaded_versions) == [1] and list(info.versions) == [1, 2]
        st = states(info)
        assert st[1] == (READY, "")
        assert st[2][0] == FAILED and st[2][1].startswith("m/2/weights.safetensors is corrupt")
        assert_no_server_path(st[2][1], tmp_path)
        assert states(c.list_models()[0]) == st
        assert c.health(timeout_s=HEALTH_S) == "SERVING"
        wait_for(lambda: c.health("segsvc.model.m", timeout_s=HEALTH_S) == "SERVING")
    text = metrics_text(server)
    assert metric(text, "segsvc_model_version_failed", model="m", version="2") == 1
    with pytest.raises(AssertionError):
        metric(text, "segsvc_model_version_failed", model="m", version="1")


def test_a_model_with_no_version_that_loads_is_not_serving(start_server, tmp_path):
    repo = tmp_path / "repo"
    publish(repo, "good", seed=4)
    bad = publish(repo, "bad", seed=5)
    (bad / WEIGHTS_FILE).write_bytes(b"garbage")
    server = start_server(repo)
    with server.client() as c:
        assert c.health(timeout_s=HEALTH_S) == "SERVING"  # another model serves
        wait_for(lambda: c.health("segsvc.model.bad", timeout_s=HEALTH_S) == "NOT_SERVING")
        assert c.health("segsvc.model.good", timeout_s=HEALTH_S) == "SERVING"
        info = c.get_model("bad")
        assert not info.ready and info.arch == "unet"  # the manifest is readable
        assert states(info)[1][0] == FAILED
        assert [m.name for m in c.list_models()] == ["bad", "good"]
        with pytest.raises((errors.ArtifactError, errors.FailedPrecondition), match="no version of model 'bad' loads: version 1: bad/1/"):
            c.load_model("bad")
    assert metric(metrics_text(server), "segsvc_model_version_failed", model="bad", version="1") == 1


def test_a_version_copied_manifest_first_loads_once_its_weights_arrive(start_server, tmp_path):
    repo = tmp_path / "repo"
    publish(repo, "m", seed=6)
    staged = publish(tmp_path / "staging", "m", seed=7, version=2)
    server = start_server(repo)  # no poller: poll_once is driven by the test
    target = repo / "m" / "2"
    target.mkdir()
    shutil.copy(staged / MANIFEST_FILE, target / MANIFEST_FILE)
    assert server.call(server.manager.poll_once()) == []
    with server.client() as c:
        st = states(c.get_model("m"))
        assert st[2][0] == FAILED and "m/2/weights.safetensors does not exist" in st[2][1]
        assert_no_server_path(st[2][1], tmp_path)
        shutil.copy(staged / WEIGHTS_FILE, target / WEIGHTS_FILE)  # the copy completes
        assert server.call(server.manager.poll_once()) == [("m", 2)]
        assert c.segment(make_image(16, 16), model="m").version == 2
        assert states(c.get_model("m"))[2] == (READY, "")
    with pytest.raises(AssertionError):  # the failure is gone from the metrics too
        metric(metrics_text(server), "segsvc_model_version_failed", model="m", version="2")


def test_a_version_symlinked_out_of_the_root_is_refused(start_server, tmp_path):
    repo = tmp_path / "repo"
    publish(repo, "m", seed=8)
    outside = publish(tmp_path / "outside", "m", seed=9, version=2)
    (repo / "m" / "2").symlink_to(outside, target_is_directory=True)
    server = start_server(repo)
    with server.client() as c:
        assert c.segment(make_image(16, 16), model="m").version == 1
        st = states(c.get_model("m"))
        assert st[2] == (FAILED, "m/2 is a symlink that leads outside the repository root; refused")
        with pytest.raises(errors.PathOutsideRoot, match="^m/2 is a symlink") as info:
            c.load_model("m", 2)
        assert_no_server_path(str(info.value), tmp_path)


def test_a_manifest_that_names_another_version_fails_that_version(start_server, tmp_path):
    repo = tmp_path / "repo"
    publish(repo, "m", seed=10)
    shutil.copytree(repo / "m" / "1", repo / "m" / "2")  # renamed copy: its manifest still says 1
    server = start_server(repo)
    with server.client() as c:
        r = c.segment(make_image(16, 16), model="m")
        assert r.version == 1
        st = states(c.get_model("m"))
        assert st[2][0] == FAILED
        assert "m/2/manifest.json describes model 'm' version 1, not 'm' version 2" in st[2][1]


def test_unknown_model_errors_name_no_server_path(start_server, tmp_path):
    repo = tmp_path / "repo"
    publish(repo, "m", seed=11)
    server = start_server(repo)
    with server.client() as c:
        for call in (lambda: c.get_model("absent"), lambda: c.load_model("absent")):
            with pytest.raises(errors.UnknownModel) as info:
                call()
            assert_no_server_path(str(info.value), tmp_path)


def test_a_manifest_whose_model_cannot_be_built_fails_the_same_way_on_every_path(start_server, tmp_path):
    """Params the builder rejects inside torch (a negative width) are a broken artifact, whichever call loads it.

    Before, torch's RuntimeError escaped the builder: LoadModel with the version number was INTERNAL, without it
    FAILED_PRECONDITION with "RuntimeError: ..." as the version's reason."""
    repo = tmp_path / "repo"
    publish(repo, "good", seed=12)
    bad = publish(repo, "bad", seed=13)
    manifest = json.loads((bad / MANIFEST_FILE).read_text())
    manifest["model"]["params"]["base_channels"] = -1
    (bad / MANIFEST_FILE).write_text(json.dumps(manifest))
    server = start_server(repo)
    with server.client() as c:
        for call in (lambda: c.load_model("bad", 1), lambda: c.load_model("bad")):
            with pytest.raises((errors.ArtifactError, errors.FailedPrecondition),
                               match="cannot build the model its manifest describes") as info:
                call()
            assert "RuntimeError" not in str(info.value)
            assert_no_server_path(str(info.value), tmp_path)
        state, reason = states(c.get_model("bad"))[1]
        assert state == FAILED and "base_channels must be a positive integer" in reason
        assert c.health(timeout_s=HEALTH_S) == "SERVING"
