"""Sharing the runs of one ``relaylearn compare`` or ``tune`` between processes on one machine.

``--workers N`` starts N − 1 helper processes of the same command (``--claim-only``); every
process walks the same list of runs and trains those it *claims* (an atomic ``mkdir`` of
``<output>/.claims/<run>``), so each run is trained once. The first process then waits for its
helpers and walks the list once more as usual: finished runs are read back, a run a helper left
unfinished (it crashed) is resumed there, and only that process writes the tables. Each process
gets ``cpu_count // N`` threads. Meant for CPUs; on one GPU the processes would share it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from relaylearn.errors import RelayError, UserError

CLAIMS = ".claims"


def check_workers(workers: int) -> None:
    if workers < 1:
        raise UserError(f"--workers {workers}: expected at least 1")


def claim(root: Path, key: str) -> bool:
    """Claim the run ``key`` under ``root`` for this process; False if another process has it."""
    folder = root / CLAIMS
    folder.mkdir(parents=True, exist_ok=True)
    try:
        (folder / key).mkdir()
    except FileExistsError:
        return False
    (folder / key / "pid").write_text(f"{os.getpid()}\n")  # who trains it, for a user looking in
    return True


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def start_helpers(argv: list[str], workers: int, root: Path) -> list[subprocess.Popen]:
    """Clear old claims, give this process its share of the threads and start ``workers - 1``
    helpers running ``relaylearn <argv> --claim-only -q``."""
    import torch

    shutil.rmtree(root / CLAIMS, ignore_errors=True)
    threads = threads_per_worker(workers)
    torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "relaylearn", *argv, "--claim-only", "-q"]
    (root / CLAIMS).mkdir(parents=True, exist_ok=True)
    helpers: list[subprocess.Popen] = []
    try:
        for i in range(1, workers):  # error output to a file: a pipe nobody reads while training could fill and stall the helper
            with open(root / CLAIMS / f"helper{i}.log", "w") as log:
                helpers.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log))
    except BaseException as exc:  # none of those already started is left training alone
        stop_helpers(helpers)
        if isinstance(exc, OSError):
            raise RelayError(f"cannot start helper {len(helpers) + 1} of --workers {workers}: {exc.strerror or exc}") from None
        raise
    return helpers


def finish_helpers(helpers: list[subprocess.Popen], root: Path) -> list[str]:
    """Wait for the helpers; one line per helper that failed, with the last line of its log."""
    failed = []
    for i, proc in enumerate(helpers, 1):
        if proc.wait() != 0:
            log = root / CLAIMS / f"helper{i}.log"
            lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
            failed.append(f"helper {i} exited with {proc.returncode} ({log}: {lines[-1] if lines else 'no output'})")
    return failed


def stop_helpers(helpers: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """Terminate the helpers still running (they stop like a killed ``train``: checkpoint kept)
    and wait for them; one that outlasts ``grace_s`` is killed."""
    for proc in helpers:
        if proc.poll() is None:
            proc.terminate()
    for proc in helpers:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def train_shared(jobs: Iterable[tuple[str, Callable[[], object]]], root: Path, *, workers: int, claim_only: bool, argv: list[str]) -> list[str]:
    """Run each ``(claim key, train)`` job this process claims; the first process (not
    ``claim_only``) starts the helpers first and waits for them after (stops them if it fails or
    is interrupted). Returns failure lines."""
    import torch

    threads = torch.get_num_threads()
    helpers = [] if claim_only else start_helpers(argv, workers, root)
    try:
        for key, train in jobs:
            if claim(root, key):
                train()
    except BaseException:
        stop_helpers(helpers)  # none is left training on after this command has ended
        raise
    finally:
        torch.set_num_threads(threads)  # the caller gets its threads back
    return [] if claim_only else finish_helpers(helpers, root)
