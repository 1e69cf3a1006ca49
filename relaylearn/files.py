"""Output files and time stamps: the one atomic writer every command uses, UTC stamps, and the
software versions recorded beside results."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from relaylearn import __version__
from relaylearn.errors import DataError, UserError

#: where run folders go: ``exps/<config name>/<run name>/``
EXPS_ROOT = Path("exps")
#: bundle hops and run.json: ``YYYY-MM-DDTHH:MM:SSZ``
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


MAX_NAME = 100  # -n: folder names stay well inside the file system's limit of 255 bytes


def check_output_name(name: str, what: str) -> None:
    """``-n NAME`` names one folder under ``exps/``: UserError unless it is a plain folder name."""
    if not name or any(c in name for c in " /\\") or not name.isprintable() or name in (".", ".."):
        raise UserError(f"-n {name!r}: {what} name must be non-empty, printable, without spaces or slashes, and not . or ..")
    if len(name) > MAX_NAME:
        raise UserError(f"-n {name[:20]}...: {what} name is {len(name)} characters long; at most {MAX_NAME}")


def check_data_root(root: Path) -> None:
    """DataError unless the data root ``root`` is a folder."""
    if not root.is_dir():
        raise DataError("data root is a file, not a folder" if root.exists() else "data root not found", root)


def utc_now() -> str:
    """The current UTC time, e.g. ``2024-05-01T12:00:00Z``."""
    return datetime.now(timezone.utc).strftime(TIMESTAMP_FORMAT)


def local_stamp() -> str:
    """The local time as a file-name stamp, e.g. ``2024-05-01_12-00-00`` (results CSVs)."""
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def csv_text(rows: Sequence[dict], *, float_format: str, fields: Sequence[str] | None = None, lineterminator: str = "\r\n") -> str:
    """``rows`` as CSV text: header ``fields`` (default: every key in order of first appearance),
    floats formatted with ``float_format`` (e.g. ``"{:.5g}"``), None as an empty cell."""
    fields = list(fields) if fields is not None else list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator=lineterminator)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else float_format.format(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def finite_or_none(value):
    """``value`` with every float that is NaN or ±inf (also inside dicts, lists and tuples)
    replaced by None, so that it can be written as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_text(value, indent: int | None = 2) -> str:
    """``value`` as strict JSON text (what every result file holds): an undefined figure (NaN, an
    infinite ratio) is written as ``null``, never as the ``NaN`` / ``Infinity`` that Python's
    ``json`` would write and other JSON readers reject."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


def software_versions(detailed: bool = False) -> dict[str, str]:
    """relaylearn, python and torch versions (what a bundle records); ``detailed`` adds
    lightning, numpy and monai (what a run folder records)."""
    import torch

    versions = {"relaylearn": __version__, "python": platform.python_version(), "torch": torch.__version__}
    if not detailed:
        return versions
    import lightning
    import numpy

    versions.update({"lightning": lightning.__version__, "numpy": numpy.__version__})
    commit = source_commit(Path(__file__).resolve().parents[1])
    if commit:
        versions["relaylearn_commit"] = commit
    try:
        import monai

        versions["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def source_commit(checkout: Path) -> str | None:
    """The git commit of a relaylearn source ``checkout`` (an editable install), with
    ``+local-changes`` when tracked files differ from it; None when ``checkout`` is not a git
    work tree or git is not installed (a wheel install: the version number says it all)."""
    git = shutil.which("git")
    if git is None or not (checkout / ".git").exists():
        return None
    try:
        head = subprocess.run([git, "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run([git, "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + ("+local-changes" if status.returncode == 0 and status.stdout.strip() else "")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, parts: Sequence[bytes | memoryview] | bytes | str, *, mode: int = 0o644, exists_error: str | None = None) -> None:
    """The one way relaylearn writes an output file: the bytes (or UTF-8 text, or a sequence of
    byte chunks) go to a random temporary name in the same folder, created exclusively with
    permissions ``mode`` and never through a symbolic link (``O_CREAT | O_EXCL | O_NOFOLLOW``), are
    fsynced, then renamed over ``path`` (a link planted at ``path`` is replaced, not followed).
    With ``exists_error`` the file must be new: it is hard-linked into place, which refuses a name
    that exists (also one that appeared meanwhile), with UserError(``exists_error``). UserError if
    it cannot write."""
    atomic_write_all([(Path(path), parts)], mode=mode, exists_error=exists_error)


def atomic_write_all(files: Sequence[tuple[Path, Sequence[bytes | memoryview] | bytes | str]], *, mode: int = 0o644, exists_error: str | None = None) -> None:
    """:func:`atomic_write` for files that belong together (a model and its sidecar): all are
    written to temporary names first, then renamed into place in order; if a rename fails, the
    files already renamed are removed again, so no mismatched set is left. UserError naming the file."""
    staged: list[tuple[Path, Path]] = []
    installed: list[Path] = []
    try:
        for path, parts in files:
            staged.append((path, _staged_copy(path, parts, mode)))
        for path, tmp in staged:
            _install(tmp, path, exists_error)
            installed.append(path)
    except BaseException:
        for path in installed:
            path.unlink(missing_ok=True)
        raise
    finally:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)
    for folder in dict.fromkeys(path.parent for path, _ in files):
        _fsync_dir(folder)


def _staged_copy(path: Path, parts: Sequence[bytes | memoryview] | bytes | str, mode: int) -> Path:
    """``parts`` written and fsynced under a new random temporary name beside ``path``."""
    if isinstance(parts, str):
        parts = [parts.encode("utf-8")]
    elif isinstance(parts, (bytes, bytearray, memoryview)):
        parts = [parts]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as exc:
        raise UserError(f"cannot write: {exc.strerror or exc}", path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            for part in parts:
                handle.write(part)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write: {exc.strerror or exc}", path) from None
        raise
    return tmp


def _install(tmp: Path, path: Path, exists_error: str | None) -> None:
    """Rename ``tmp`` to ``path``; with ``exists_error`` only if ``path`` is new (a hard link refuses
    an existing name atomically; file systems without hard links get a rename after a check)."""
    try:
        if exists_error is None:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            raise UserError(exists_error, path) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if path.exists() or path.is_symlink():
                raise UserError(exists_error, path) from None
            os.rename(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write: {exc.strerror or exc}", path) from None


def check_new_bundle_path(path: Path) -> None:
    """``path`` (a bundle's ``--out``) names a new file that can be written: its folder exists or
    can be made, and lets us write. Checked before any work, so hours of training never end in an
    unwritable ``--out``, and no file already there (the only copy of an earlier hop, say) is
    replaced. UserError otherwise."""
    check_output_file(path, "already exists; a bundle is never overwritten: choose another name or move that file away")


def check_output_file(path: Path, exists_error: str | None, option: str = "--out") -> None:
    """``path`` (given as ``option``) is a file name whose folder exists or can be made and lets us
    write, and (``exists_error`` given) nothing is there yet: UserError(``exists_error``)."""
    if path.is_dir():
        raise UserError(f"is a folder; {option} needs a file name", path)
    if exists_error is not None and (path.exists() or path.is_symlink()):
        raise UserError(exists_error, path)
    check_writable_folder(path.parent, path)


def check_writable_folder(folder: Path, path: Path | None = None) -> None:
    """``folder`` exists or can be made, and lets us write; UserError naming ``path`` (default:
    ``folder``) otherwise."""
    path = folder if path is None else path
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write here: {folder} is not a writable folder", path)
