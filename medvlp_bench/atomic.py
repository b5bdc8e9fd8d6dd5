"""All-or-nothing file writes: a temp file in the target folder, fsync, rename.

Readers (a leaderboard build, another bench process, a resumed run) never see a half-written file, and a
failure or a kill leaves at most the previous version behind, never a torn one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)


class ResultsWriteError(OSError):
    """A file cannot be written (missing permission, disk full, a file where a folder should be)."""


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Open a temp file for binary writing; on success it replaces ``path``, on any failure it is removed."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise ResultsWriteError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def shared_mode_dir(path: Path) -> None:
    """``mkdtemp`` folders are 0700; give a finished folder the usual permissions."""
    os.chmod(path, 0o777 & ~_UMASK)
