"""Resuming a site after the process died: SIGKILL during a hospital's deploy step, then
``--resume``; and resumed training equals uninterrupted training bit for bit."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from relaylearn import engine
from relaylearn.bundle import read_bundle
from relaylearn.config import load_config
from relaylearn.keys import generate_keypair, load_private_key
from relaylearn.runner import TrainOptions, run_training
from tests.conftest import TINY, run_cli, tiny_config

TOTAL_STEPS = 20
EVERY = 5
STARTUP_TIMEOUT_S = 300  # imports and the first batches on a loaded 2-core machine


def train_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "relaylearn", "train", "-c", str(config), "-n", "site", "-g", "cpu", *extra]


def environment() -> dict[str, str]:
    # one thread: several busy threads on a shared 2-core machine slow each other down a lot
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def train_events(folder: Path) -> dict[str, list[int]]:
    """Steps of the ``train/loss`` scalars in each TensorBoard event file of ``folder`` (by file name)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        events = EventFileLoader(str(path)).Load()
        steps[path.name] = [e.step for e in events if any(v.tag == "train/loss" for v in e.summary.value)]
    return steps


def kill_after_first_checkpoint(command: list[str], cwd: Path, checkpoint: Path) -> None:
    """Start ``command``; SIGKILL it as soon as ``checkpoint`` exists (its output goes to ``cwd/killed.log``)."""
    log = cwd / "killed.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=cwd, env=environment(), stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not checkpoint.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended (exit {process.returncode}) before its first checkpoint:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_hospital_killed_mid_site_resumes_from_its_checkpoint(tmp_path, tiny_fundus):
    """Hospital B trains TOTAL_STEPS batches from hop 1 (signed, verified); SIGKILL after the first
    local checkpoint; the same command with ``--resume`` continues from the checkpoint instead of
    starting over, and leaves nothing half-written."""
    keys, trust = tmp_path / "keys", tmp_path / "trust"
    for site in ("Hospital-A", "Hospital-B"):
        generate_keypair(keys, site)
    trust.mkdir()
    for site in ("Hospital-A", "Hospital-B"):
        (trust / f"{site}.pub").write_bytes((keys / f"{site}.pub").read_bytes())
    (trust / "relay-id").write_text("resume-relay\n")  # the relay both sites belong to
    (tmp_path / "a").mkdir()
    hop1_cfg = load_config(str(tiny_config(tmp_path / "a", tiny_fundus, task_ids=(1,), steps=1)))
    hop1 = run_training(
        hop1_cfg, "a", TrainOptions(quiet=True, key=str(keys / "Hospital-A.key"), relay_id="resume-relay", exps_root=tmp_path / "a" / "exps", devices="cpu")
    )
    incoming = hop1.bundles[0]

    site = tmp_path / "b"
    site.mkdir()
    config = tiny_config(site, tiny_fundus, task_ids=(2,), steps=TOTAL_STEPS, checkpoint_every_n_steps=EVERY)
    command = train_command(
        config, "--recipe", "local", "--in", str(incoming), "--key", str(keys / "Hospital-B.key"), "--trust", str(trust), "--out", str(tmp_path / "hop2.relay")
    )
    run_dir = site / "exps" / "sequential" / "site"
    checkpoint = run_dir / "checkpoints" / "task_2" / "last.ckpt"
    kill_after_first_checkpoint(command, site, checkpoint)
    assert not (tmp_path / "hop2.relay").exists() and not (run_dir / "bundles").exists()
    killed_files = set(train_events(run_dir / "tensorboard" / "task_2"))

    # the same command with --resume (in this process: it has the libraries loaded already)
    resumed = run_cli(site, *command[3:], "--resume")
    assert resumed.code == 0, resumed.err[-3000:]
    assert "resuming from" in resumed.err and "checkpoints/task_2/last.ckpt" in resumed.err
    resumed_at = int(re.search(rf"resumed at batch (\d+) of {TOTAL_STEPS}", resumed.err).group(1))
    assert resumed_at >= EVERY and resumed_at % EVERY == 0

    # the resumed run trained exactly the remaining batches (TensorBoard: one loss per batch)
    events = train_events(run_dir / "tensorboard" / "task_2")
    steps_after = sorted(step for name, steps in events.items() if name not in killed_files for step in steps)
    assert len(steps_after) == TOTAL_STEPS - resumed_at
    assert steps_after[0] >= resumed_at

    bundle = read_bundle(tmp_path / "hop2.relay", trust=None, allow_unsigned=True)
    assert bundle.registry["global_step"] == 1 + TOTAL_STEPS  # hop 1's batch, then this site's
    assert bundle.hops[-1]["signer"] == load_private_key(keys / "Hospital-B.key").fingerprint
    assert bundle.hops[-1]["parent_sha256"] == read_bundle(incoming, trust=None, allow_unsigned=True).sha256
    assert not list(site.rglob("*.tmp*")) and not list(tmp_path.glob(".*tmp*"))
    assert not checkpoint.exists(), "the site is done: its resume point is the bundle"


@pytest.mark.parametrize(
    ("strategy", "task_id", "steps", "every", "killed_at", "extra"),
    [
        ("relay", 2, 4, 3, 3, {}),  # a second site (replay, merge at batch 2): checkpoint after batch 3, mid-epoch
        ("relay", 2, 4, 3, 3, {"generator_ema_steps": 2}),  # the generators' moving average continues too
        ("sequential", 1, 4, 2, 3, {}),  # checkpoint after batch 2, the end of an epoch (2 batches per epoch)
    ],
)
def test_resumed_site_equals_an_uninterrupted_one(tmp_path, tiny_fundus, monkeypatch, strategy, task_id, steps, every, killed_at, extra):
    """Data order, random stream, optimizer and strategy state all continue where they stopped."""
    kwargs = {**TINY, **extra} if strategy == "relay" else None
    full_path = tiny_config(
        tmp_path, tiny_fundus, strategy=strategy, task_ids=tuple(range(1, task_id + 1)), steps=steps, strategy_kwargs=kwargs, checkpoint_every_n_steps=every
    )
    raw = yaml.safe_load(full_path.read_text())
    raw["current_tasks"]["task_confs"] = {1: {"train": {"num_steps": 1}}} if task_id == 2 else {}  # site 1 only makes site 2's start
    full_path.write_text(yaml.safe_dump(raw))
    full = run_training(load_config(str(full_path)), "full", TrainOptions(quiet=True, exps_root=tmp_path / "exps", devices="cpu"))

    site_cfg = load_config(
        str(tiny_config(tmp_path, tiny_fundus, strategy=strategy, task_ids=(task_id,), steps=steps, strategy_kwargs=kwargs, checkpoint_every_n_steps=every))
    )
    incoming = {"in_bundle": str(full.bundles[0]), "insecure_unsigned": True, "recipe": "local"} if task_id == 2 else {}  # site 1 had a shorter budget
    opts = TrainOptions(quiet=True, exps_root=tmp_path / "exps", devices="cpu", **incoming)
    trained = []
    real_step = engine.SiteModule.training_step

    def dies_at_batch(self, batch, batch_idx):
        if self._local_step() == killed_at:
            raise RuntimeError("power cut")
        trained.append(self._local_step())
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(engine.SiteModule, "training_step", dies_at_batch)
    with pytest.raises(RuntimeError, match="power cut"):
        run_training(site_cfg, "cut", opts)
    monkeypatch.setattr(engine.SiteModule, "training_step", real_step)
    resumed = run_training(site_cfg, "cut", TrainOptions(**{**opts.__dict__, "resume": True}))

    assert trained == list(range(killed_at))
    assert resumed.matrix["R"] == full.matrix["R"][-1:]
    expected = read_bundle(full.bundles[-1], trust=None, allow_unsigned=True)
    got = read_bundle(resumed.bundles[0], trust=None, allow_unsigned=True)
    assert got.registry == expected.registry
    assert [name for name in expected.tensors if not torch.equal(expected.tensors[name], got.tensors[name])] == []


def test_a_resumed_site_keeps_the_generator_snapshots_taken_before_it_stopped(tmp_path, tiny_fundus, monkeypatch):
    """The snapshot taken after batch 2 is in the checkpoint written after it: a site stopped at
    batch 3 and resumed still picks it (the scores prefer the earliest candidate, so a lost
    snapshot would leave the final generators and other tensors than an uninterrupted run)."""
    import itertools

    from relaylearn.strategies.relay import Relay

    calls = itertools.count()
    monkeypatch.setattr(Relay, "_score_generators", lambda self, sites: [-float(next(calls))] * len(sites))
    test_resumed_site_equals_an_uninterrupted_one(tmp_path, tiny_fundus, monkeypatch, "relay", 2, 4, 1, 3, {"generator_snapshots": 2, "snapshot_samples": 4})


@pytest.mark.parametrize(("stop", "code", "words"), [("ctrl-c", 130, "interrupted (Ctrl-C)"), ("sigterm", 143, "terminated (SIGTERM)")])
def test_a_stopped_training_exits_non_zero_and_says_how_to_continue(tmp_path, tiny_fundus, monkeypatch, capsys, stop, code, words):
    """Lightning turns Ctrl-C into exit 1 without a word and SIGTERM into exit 0 (a wrapper would
    take the hop as done); here both are one line, a non-zero code, and --resume continues."""
    from relaylearn.cli import main
    from relaylearn.strategies.sequential import Sequential

    original = Sequential.training_step
    calls = []

    def stopping_step(self, batch, step):
        calls.append(1)
        if len(calls) == 3:
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler stops the loop at the next batch
        return original(self, batch, step)

    monkeypatch.setattr(Sequential, "training_step", stopping_step)
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(1,), steps=8, checkpoint_every_n_steps=2)
    argv = ["train", "-c", str(config), "-n", "s", "-g", "cpu", "-q"]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "--resume" in err[0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "Ctrl-C works again afterwards"
    assert not list((tmp_path / "exps").rglob("*.relay"))
    monkeypatch.setattr(Sequential, "training_step", original)
    assert main([*argv, "--resume"]) == 0


def test_a_sigterm_after_the_last_batch_still_stops_the_run(tmp_path, tiny_fundus, monkeypatch, capsys):
    """Lightning only notes a SIGTERM that comes after a site's last batch (in its closing work,
    e.g. EWC's Fisher pass); the run went on to the next site and exited 0."""
    from relaylearn.cli import main
    from relaylearn.strategies.sequential import Sequential

    ended = []

    def terminated_while_closing(self, site):
        ended.append(site)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Sequential, "on_site_end", terminated_while_closing)
    config = tiny_config(tmp_path, tiny_fundus, task_ids=(1, 2), steps=2)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "-c", str(config), "-n", "s", "-g", "cpu", "-q"]) == 143
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    assert len(ended) == 1 and not list((tmp_path / "exps").rglob("*.relay")), "site 2 did not start"


def _finished(tmp_path, tiny_fundus, *sets):
    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, task_ids=(1, 2), steps=2)), list(sets))
    opts = TrainOptions(quiet=True, exps_root=tmp_path / "exps", devices="cpu")
    return cfg, opts, run_training(cfg, "r", opts)


def test_resume_keeps_the_runs_records_and_one_results_file(tmp_path, tiny_fundus):
    """A resumed run keeps its start, first command and results file (the stopped part's rows are
    carried over), and records when it was resumed."""
    import csv
    import dataclasses
    import json

    cfg, opts, first = _finished(tmp_path, tiny_fundus)
    run = first.run_dir
    (run / "bundles" / "task_2.relay").unlink()  # as if stopped before site 2's bundle
    before = json.loads((run / "run.json").read_text())
    again = run_training(cfg, "r", dataclasses.replace(opts, resume=True))
    info = json.loads((run / "run.json").read_text())
    assert (info["started_utc"], info["argv"], info["results_stamp"]) == (before["started_utc"], before["argv"], before["results_stamp"])
    assert len(info["resumed"]) == 1
    (entry,) = info["resumed"]
    assert entry["threads"] == torch.get_num_threads() and entry["precision"] == before["precision"], "how the resumed part ran"
    (results,) = (run / "test_results").glob("results_*.csv")
    assert sorted({r["task_id"] for r in csv.DictReader(results.open())}) == ["1", "2"]
    assert again.matrix["R"] == first.matrix["R"]


def test_resume_evaluates_a_bundle_whose_row_is_missing(tmp_path, tiny_fundus):
    """A run stopped after writing a site's bundle and before its metrics (older versions wrote
    them in that order): the row is computed again from the bundle, not dropped or shifted."""
    import dataclasses
    import json

    cfg, opts, first = _finished(tmp_path, tiny_fundus)
    matrix_path = first.run_dir / "metrics" / "matrix.json"
    matrix = json.loads(matrix_path.read_text())
    matrix_path.write_text(json.dumps({**matrix, "R": matrix["R"][:1], "trained": matrix["trained"][:1]}))
    for csv_file in (first.run_dir / "test_results").glob("*.csv"):
        csv_file.unlink()
    again = run_training(cfg, "r", dataclasses.replace(opts, resume=True))
    assert again.matrix["trained"] == ["Domain1", "Domain2"]
    assert torch.allclose(torch.tensor(again.matrix["R"]), torch.tensor(first.matrix["R"]), atol=1e-5)


def test_resume_with_another_config_or_beside_a_running_process_is_refused(tmp_path, tiny_fundus):
    import dataclasses
    import fcntl

    from relaylearn.errors import ConfigError, UserError

    cfg, opts, first = _finished(tmp_path, tiny_fundus)
    changed = load_config(str(tiny_config(tmp_path, tiny_fundus, task_ids=(1, 2), steps=2)), ["train.optimizer.lr=0.05"])
    with pytest.raises(ConfigError, match=r"--resume with another config .*train\.optimizer\.lr: 0\.05 now, 0\.001 before"):
        run_training(changed, "r", dataclasses.replace(opts, resume=True))
    with open(first.run_dir / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another relaylearn process is training in this run folder"):
            run_training(cfg, "r", dataclasses.replace(opts, resume=True))


def test_resume_on_changed_training_data_is_refused(tmp_path, tiny_fundus, monkeypatch, capsys):
    """The same data order and an uninterrupted run's result need the same data: a site whose
    training images changed since it stopped is not resumed silently."""
    import shutil

    from relaylearn.cli import main
    from relaylearn.strategies.sequential import Sequential

    data = tmp_path / "data"
    shutil.copytree(tiny_fundus, data)
    original = Sequential.training_step
    calls = []

    def stopping_step(self, batch, step):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, batch, step)

    monkeypatch.setattr(Sequential, "training_step", stopping_step)
    config = tiny_config(tmp_path, data, task_ids=(1,), steps=8, checkpoint_every_n_steps=2)
    argv = ["train", "-c", str(config), "-n", "s", "-g", "cpu", "-q"]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 130
    monkeypatch.setattr(Sequential, "training_step", original)
    for part in ("image", "mask"):
        sorted((data / "Domain1" / "train" / "ROIs" / part).iterdir())[-1].unlink()
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "the training data of site Domain1 changed since the run stopped" in capsys.readouterr().err


def test_resume_compares_free_option_keys_and_the_test_sites(tmp_path, tiny_fundus):
    """A loss/strategy/model option set now and not before (those blocks take any key) and another
    set of test sites are changes too: the earlier rows would be published under them."""
    import dataclasses

    from relaylearn.errors import ConfigError

    cfg, opts, first = _finished(tmp_path, tiny_fundus)
    resume = dataclasses.replace(opts, resume=True)
    added = load_config(str(tiny_config(tmp_path, tiny_fundus, task_ids=(1, 2), steps=2)), ["train.loss.kwargs.gamma=0.9"])
    with pytest.raises(ConfigError, match=r"train\.loss\.kwargs\.gamma: 0\.9 now, unset before"):
        run_training(added, "r", resume)
    fewer_tests = load_config(str(tiny_config(tmp_path, tiny_fundus, task_ids=(1, 2), steps=2)))
    fewer_tests.test_datasets = fewer_tests.test_datasets[:2]
    with pytest.raises(ConfigError, match=r"test sites: Domain1, Domain2 now, Domain1, Domain2, Domain3 before"):
        run_training(fewer_tests, "r", resume)
    assert run_training(cfg, "r", resume).matrix["R"] == first.matrix["R"]


def test_resume_after_a_bundle_finishes_the_sites_audit_and_removes_its_checkpoint(tmp_path, tiny_fundus):
    """Stopped after site 1's bundle, before its privacy audit and the removal of its resume point:
    --resume does both (the audit equals the one an uninterrupted run wrote)."""
    import dataclasses
    import json

    cfg = load_config(str(tiny_config(tmp_path, tiny_fundus, strategy="relay", strategy_kwargs=TINY, task_ids=(1, 2), steps=2)))
    opts = TrainOptions(quiet=True, exps_root=tmp_path / "exps", devices="cpu")
    first = run_training(cfg, "r", opts)
    privacy_path = first.run_dir / "metrics" / "privacy.json"
    privacy = json.loads(privacy_path.read_text())
    assert [h["hop"] for h in privacy["hops"]] == [1, 2]
    privacy_path.write_text(json.dumps({**privacy, "hops": privacy["hops"][1:]}))
    leftover = first.run_dir / "checkpoints" / "task_1" / "last.ckpt"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"stale")
    run_training(cfg, "r", dataclasses.replace(opts, resume=True))
    again = json.loads(privacy_path.read_text())
    assert [h["hop"] for h in again["hops"]] == [1, 2] and not leftover.exists()
    (before_site,), (after_site,) = privacy["hops"][0]["sites"].values(), again["hops"][0]["sites"].values()
    assert after_site["flagged"] == before_site["flagged"]  # the same audit, from the bundle's generators (float rounding aside)
    for old, new in zip(before_site["checks"], after_site["checks"], strict=True):
        old_ratio, new_ratio = (c.get("ratio_of_medians", {}).get("value") for c in (old, new))
        assert new["check"] == old["check"] and (new_ratio == old_ratio or new_ratio == pytest.approx(old_ratio, rel=1e-5))


def test_earlier_rows_are_kept_only_for_the_same_test_sites():
    from relaylearn.runner import _previous_hop

    previous = {"sites": ["A", "B"], "trained": ["A"], "R": [[0.5, 0.1]], "validation": {"R": [[0.4]]}, "per_class": {}}
    assert _previous_hop(previous, 0, "A", ["A", "B"]) == ([0.5, 0.1], [0.4], None)
    assert _previous_hop(previous, 0, "A", ["A", "B", "C"]) is None  # evaluated again with the new column
    assert _previous_hop(previous, 0, "B", ["A", "B"]) is None
