"""Two-process DDP on the CPU (gloo) through the real CLI: Lightning re-executes the command line
for rank 1, a new Trainer runs every site in the same processes, and only rank 0 writes files.

Slow (two processes, about 15-30 s per run on a busy machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relaylearn.bundle import read_bundle
from tests.conftest import ROOT, TINY, tiny_config

pytestmark = pytest.mark.slow

# val_fraction=0: the tiny sites' 6 images in batches of 4 over 2 ranks; holding one out would leave rank 1 a batch of one;
# train.lightning.strategy stays auto (the relay needs DDP to find the parameters a step leaves unused: the engine asks for that)
DDP_SETTINGS = [
    "-g",
    "cpu",
    "--set",
    "train.lightning.devices=2",
    "--set",
    "dataset.kwargs.val_fraction=0",
    "-q",
]

# Runs the real CLI; after every site it also writes, per rank, the sum of every floating tensor of
# the strategy (parameters and buffers, float64), so the test can compare the ranks' final states.
STATE_DUMPING_CLI = """
import json, sys
import torch
from lightning.pytorch.utilities import rank_zero_only
from relaylearn import runner

_train_site = runner.RelayRun._train_site

def train_site_and_dump(self, group, parent, position):
    hop = _train_site(self, group, parent, position)
    sums = {k: float(v.double().sum()) for k, v in hop.strategy.state_dict().items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}
    (self.run_dir / f"state_site{position}_rank{rank_zero_only.rank}.json").write_text(json.dumps(sums))
    return hop

runner.RelayRun._train_site = train_site_and_dump
from relaylearn.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def _run_ddp(tmp_path: Path, command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command + DDP_SETTINGS, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_run_outputs(run_dir: Path, proc: subprocess.CompletedProcess) -> None:
    """One set of results, written by rank 0 only, with a consistent bundle chain."""
    assert proc.stdout.count("run folder:") == 1, proc.stdout  # rank 1 ends quietly
    assert sorted(p.name for p in (run_dir / "bundles").iterdir()) == ["task_1.relay", "task_2.relay"]
    assert len(list((run_dir / "test_results").glob("results_*.csv"))) == 1
    matrix = json.loads((run_dir / "metrics" / "matrix.json").read_text())
    assert matrix["trained"] == ["Domain1", "Domain2"] and len(matrix["R"]) == 2
    b1, b2 = (run_dir / "bundles" / f"task_{i}.relay" for i in (1, 2))
    second = read_bundle(b2, trust=None, allow_unsigned=True)
    assert [h["site"] for h in second.hops] == ["Domain1", "Domain2"]
    # site 2 started from the very file on disk (no rank overwrote it afterwards)
    assert second.hops[1]["parent_sha256"] == hashlib.sha256(b1.read_bytes()).hexdigest()


def test_sequential_baseline_trains_two_sites_under_ddp(tmp_path, tiny_fundus):
    config = tiny_config(tmp_path, tiny_fundus, strategy="sequential", steps=2)
    proc = _run_ddp(tmp_path, [sys.executable, "-m", "relaylearn", "train", "-c", str(config), "-n", "x"])
    _check_run_outputs(tmp_path / "exps" / "sequential" / "x", proc)


def test_relay_trains_two_sites_under_ddp_with_ranks_in_step(tmp_path, tiny_fundus):
    config = tiny_config(tmp_path, tiny_fundus, strategy="relay", steps=2, strategy_kwargs={**TINY, "g_reg_interval": 1})
    driver = tmp_path / "relaylearn_dumping_state.py"
    driver.write_text(STATE_DUMPING_CLI)
    proc = _run_ddp(tmp_path, [sys.executable, str(driver), "train", "-c", str(config), "-n", "x"])
    run_dir = tmp_path / "exps" / "relay" / "x"
    _check_run_outputs(run_dir, proc)

    # after site 2 (with replay, G/D/solver steps each averaging gradients) both ranks hold the
    # same networks, ADA probabilities and path-length means; running statistics of each rank's own
    # forward passes (BatchNorm, the mapping networks' w_avg, ADA's sign accumulators) stay per rank
    ranks = [json.loads((run_dir / f"state_site1_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    per_rank = ("running_mean", "running_var", "num_batches_tracked", "w_avg", "_ctl.sign_sum", "_ctl.num_steps")
    compared = [k for k in ranks[0] if not k.endswith(per_rank)]
    assert "ada_img.p" in compared and "pl_mean_img" in compared
    assert any(k.startswith("g_img.") for k in compared) and any(k.startswith("solver.") for k in compared)
    assert {k: ranks[0][k] for k in compared} == {k: ranks[1][k] for k in compared}
    assert ranks[0]["pl_mean_img"] != 0.0 and ranks[0]["pl_mean_label"] != 0.0  # the penalty ran (interval 1)
