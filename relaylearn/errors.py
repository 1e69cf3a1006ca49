"""Errors that reach the user as one line and a documented exit code (docs/design.md#exit-codes)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class RelayError(Exception):
    """Base of every error the command line turns into one line on stderr."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UserError(RelayError):
    """Bad input: usage, config, data or key problems (exit code 2)."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or --set override is invalid."""


class DataError(UserError):
    """A dataset folder or file is missing, unreadable or inconsistent."""


class VerificationError(RelayError):
    """A relay bundle failed verification (exit code 3)."""

    exit_code = 3


class Interrupted(RelayError):
    """Training was stopped by Ctrl-C (exit code 130) or a termination signal (143); the local
    checkpoint is kept. ``how_to_continue`` ends the line: ``--resume`` unless the command resumes
    by itself (:func:`resumes_by_rerunning`)."""

    exit_code = 130
    RESUME = "run the same command again with --resume to continue"
    RERUN = "run the same command again to continue (finished runs are skipped)"

    def __init__(self, message: str, exit_code: int = 130, how_to_continue: str = RESUME):
        super().__init__(message)
        self.exit_code = exit_code
        self.how_to_continue = how_to_continue

    def __str__(self) -> str:
        return f"{self.message}: {self.how_to_continue}"


@contextmanager
def resumes_by_rerunning() -> Iterator[None]:
    """For commands that resume when run again (compare, tune, the demo; they take no
    ``--resume``): an :class:`Interrupted` inside says so."""
    try:
        yield
    except Interrupted as exc:
        exc.how_to_continue = Interrupted.RERUN
        raise
