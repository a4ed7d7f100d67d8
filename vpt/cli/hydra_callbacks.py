"""Hydra callbacks of the train command.

Hydra creates the run folder before the task function runs; a folder that cannot be
created (read-only parent, a file in the way) would end in Hydra's traceback. This check
runs first and says it in one sentence, and notes which folders Hydra is about to make so
that a run vpt refuses leaves none behind.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vpt.cli.errors import note_run_folder
from vpt.errors import VptError
from vpt.runs import check_folder_writable

__all__ = ["OutputFolderCheck"]


class OutputFolderCheck(Callback):
    """Stop with exit code 2 and one sentence when the output folder cannot be written."""

    def _check(self, folder: Any, what: str) -> None:
        try:
            check_folder_writable(Path(str(folder)), what)
        except VptError as error:
            print(f"vpt: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")
        # Before Hydra makes the folder: a run refused by vpt's checks removes what Hydra made.
        note_run_folder(Path(str(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
