"""Write files so that a crash or a full disk never leaves a half-written file under the final name.

Every writer goes to a temporary file in the destination's folder (same file system, so the rename is atomic), is
flushed and fsynced, then renamed over the destination with ``os.replace``. On any error the temporary file is removed
and an existing destination is untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

__all__ = ["atomic_path", "atomic_open", "write_bytes", "write_text", "write_json", "save_with"]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers that look at it pick the right format); once
    the block ends without error, the file there is fsynced and renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _keep_mode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` for writing ("w", "wb"), made atomic as :func:`atomic_path`."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files: mode {mode!r} must start with 'w'")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | Path, obj: Any, **kwargs: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, **kwargs)


def save_with(path: str | Path, save: Callable[[str], Any]) -> None:
    """Call a library writer ``save(tmp_path)`` (PIL ``image.save``, ``trimesh.export``, ``save_file`` ...) atomically."""
    with atomic_path(path) as tmp:
        save(str(tmp))


def _keep_mode(path: Path, tmp: Path) -> None:
    """mkstemp creates 0600 files: give the new file the old file's mode, or the umask default."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.chmod(tmp, mode)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
