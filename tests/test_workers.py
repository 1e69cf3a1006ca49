"""Sharing runs between processes: claims and helper failures."""

from __future__ import annotations

import subprocess
import sys

import pytest

from relaylearn.errors import RelayError
from relaylearn.workers import CLAIMS, claim, finish_helpers, start_helpers


def test_a_run_is_claimed_once_and_names_its_process(tmp_path):
    assert claim(tmp_path, "relay__order0_seed0")
    assert not claim(tmp_path, "relay__order0_seed0")
    assert claim(tmp_path, "relay__order1_seed0")
    assert (tmp_path / CLAIMS / "relay__order0_seed0" / "pid").read_text().strip().isdigit()


def test_a_failed_helper_is_reported_with_its_last_log_line(tmp_path):
    (tmp_path / CLAIMS).mkdir()
    helpers = []
    for i, code in ((1, 0), (2, 3)):
        with open(tmp_path / CLAIMS / f"helper{i}.log", "w") as log:
            script = f"import sys; sys.stderr.write('warming up' + chr(10) + 'relaylearn: error: disk full' + chr(10)); sys.exit({code})"
            helpers.append(subprocess.Popen([sys.executable, "-c", script], stderr=log))
    (problem,) = finish_helpers(helpers, tmp_path)
    assert problem.startswith("helper 2 exited with 3") and problem.endswith("relaylearn: error: disk full)")


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_helpers_are_stopped_when_the_first_process_fails(tmp_path, monkeypatch, failure):
    import relaylearn.workers as workers

    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    monkeypatch.setattr(workers, "start_helpers", lambda argv, n, root: [helper])

    def failing():
        raise failure

    try:
        with pytest.raises(type(failure)):
            workers.train_shared([("run0", failing)], tmp_path, workers=2, claim_only=False, argv=[])
        assert helper.poll() is not None, "the helper was left running"
    finally:
        helper.kill()
        helper.wait()


def test_helpers_already_started_are_stopped_when_the_next_one_cannot_start(tmp_path, monkeypatch):
    """--workers 3: the second helper fails to start (no process slots left) — the first one
    was left training on its own after the command had failed."""
    import relaylearn.workers as workers

    started, real_popen = [], subprocess.Popen

    def popen(command, **kwargs):
        if started:
            raise OSError(11, "Resource temporarily unavailable")
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(120)"]))
        return started[-1]

    monkeypatch.setattr(workers.subprocess, "Popen", popen)
    monkeypatch.setattr(workers, "threads_per_worker", lambda n: 1)
    try:
        with pytest.raises(RelayError, match="cannot start helper 2 of --workers 3: Resource temporarily unavailable"):
            start_helpers(["compare"], 3, tmp_path)
        assert started[0].poll() is not None, "the first helper was left running"
    finally:
        started[0].kill()
        started[0].wait()
