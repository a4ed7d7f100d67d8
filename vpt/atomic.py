"""Atomic file writes for everything a run writes.

A crash (or ``kill -9``) while a checkpoint, a trained-weights file or ``metrics.json`` is
being written must leave either the old file or the new one, never half of one. Every
writer therefore writes to a temporary file in the same folder, flushes it to disk and
renames it into place (``os.replace`` is atomic on POSIX and Windows within one file
system). ``tempfile.mkstemp`` creates files readable by the owner only; the file gets the
permissions an ordinary ``open()`` would have given it (``0o666`` less the umask), so a
trained-weights file is as readable as the rest of the run folder.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "default_file_mode"]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666`` less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The caller writes the complete file to the yielded path (any writer that takes a path:
    ``safetensors.torch.save_file``, ``torch.save``, ``matplotlib`` ``savefig`` ...). If the
    block raises, the temporary file is removed and ``path`` is left as it was.

    Args:
        path: The final file.

    Yields:
        The temporary file to write (same folder, same suffix, so writers that look at the
        suffix pick the same format).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))
