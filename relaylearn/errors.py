"""Errors that reach the user as one line and a documented exit code (docs/design.md#exit-codes)."""

from __future__ import annotations

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
    checkpoint is kept for ``--resume``."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
