"""Two servers on one ``--state-dir``: the second refuses to start, with an error naming the folder."""

from __future__ import annotations

import pytest

from segsvc import errors
from segsvc.jobs.batch import JobsConfig
from tests.server.conftest import encode, make_image, publish


def test_a_second_server_on_the_same_state_dir_is_refused(start_server, tmp_path):
    publish(tmp_path / "repo", "tiny", seed=11)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(encode(make_image(16, 16, seed=1)))
    jobs = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data")
    first = start_server(tmp_path / "repo", jobs=jobs)
    with pytest.raises(errors.FailedPrecondition, match="state folder"):
        start_server(tmp_path / "repo", jobs=jobs)
    with first.client(timeout_s=30) as c:  # the first one goes on serving its jobs
        assert c.submit_job(["."], model="tiny").wait(timeout_s=60).state == "SUCCEEDED"
