"""Writing prediction outputs without ever replacing a file.

Every output is written under its final name into a hidden temporary folder beside it and
then hard-linked into place: a link fails atomically when the name is taken, and writers
that create companion files (MetaImage ``.mhd`` names its ``.zraw`` data file inside the
header) keep their names. A crash leaves no half-written output.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from vpt.errors import ConfigError

__all__ = ["check_outputs_free", "move_without_overwrite", "write_new_files"]

_logger = logging.getLogger(__name__)


def _exists_error(path: Path) -> ConfigError:
    return ConfigError(f"{path} already exists; pass another output=<folder> (prediction never overwrites files).")


def check_outputs_free(paths: Sequence[Path]) -> None:
    """Refuse to start when a planned output exists, before any work is done.

    Raises:
        ConfigError: The first existing path, named with the fix.
    """
    for path in paths:
        if path.exists():
            raise _exists_error(path)


def move_without_overwrite(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, refusing to replace an existing ``target``.

    File systems without hard links fall back to a check and a rename.

    Raises:
        ConfigError: ``target`` exists.
    """
    try:
        os.link(source, target)
    except FileExistsError:
        raise _exists_error(target) from None
    except OSError:
        if target.exists():
            raise _exists_error(target) from None
        os.replace(source, target)
        return
    source.unlink()


def write_new_files(path: Path, write: Callable[[Path], object]) -> list[Path]:
    """Write ``path`` (and any companion files its writer creates) without replacing a file.

    Args:
        path: The final file; its parent folder is created.
        write: Writes the complete file to the path it is given (same name, another folder).

    Returns:
        The files now in ``path``'s folder, ``path`` first.

    Raises:
        ConfigError: One of the files exists already (nothing of this call is left behind
            but the files moved before it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vpt-predict-", dir=path.parent) as scratch:
        write(Path(scratch) / path.name)
        written = sorted(Path(scratch).iterdir(), key=lambda file: (file.name != path.name, file.name))
        for file in written:
            move_without_overwrite(file, path.parent / file.name)
    return [path.parent / file.name for file in written]
