"""Check a whole data set folder at once and list every problem, like nnU-Net's
``verify_dataset_integrity`` but without stopping at the first one.

:func:`find_cases` and :func:`load_case` raise on the first bad case, which is right at the
start of a run but makes fixing a data set a loop of one error per attempt.
:func:`check_dataset` walks the folder itself and returns every :class:`Problem`;
:func:`examine_dataset` also says how many cases it checked.

What is checked depends on the layout; each layout class says it
(:mod:`vpt.data.medical.layouts`: ``nnunet``, ``synapse``, ``folder2d``, ``phantoms``). The
check and the loaders group files into cases with the same method of the same layout object,
so the cases checked are the cases a run uses. Problem kinds and their levels are
:data:`PROBLEM_LEVELS` (:mod:`vpt.data.medical.layouts.checks` says why each level).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from vpt.data.medical.layouts import README, detect_layout, get_layout
from vpt.data.medical.layouts.checks import LEVELS, PROBLEM_LEVELS, Findings, Problem
from vpt.errors import DataError

__all__ = ["LEVELS", "PROBLEM_LEVELS", "DatasetCheck", "Problem", "check_dataset", "examine_dataset"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetCheck:
    """What :func:`examine_dataset` found.

    Attributes:
        layout: The layout the folder was checked as.
        cases: How many cases (training and test, labelled or not) were checked.
        problems: As :func:`check_dataset` returns them.
    """

    layout: str
    cases: int
    problems: list[Problem]
    #: The cases checked as ``(folder or split, case id)``, sorted: ``("Tr", "case_001")``,
    #: ``("Ts", ...)``, ``("images", ...)`` (2D folders), ``("train_npz", ...)`` / ``("test_vol_h5", ...)``.
    case_ids: tuple[tuple[str, str], ...] = ()


def check_dataset(root: str | Path, layout: str = "auto", read_values: bool = True) -> list[Problem]:
    """List every problem of a data set folder (:func:`examine_dataset`'s problems).

    Args:
        root: The data set folder.
        layout: One of ``LAYOUTS``, or ``"auto"`` to detect it as :func:`find_cases` does.
        read_values: Also read every voxel (NaN/inf, label values, empty labels); ``False``
            checks only names and headers, which is much faster for large sets.

    Returns:
        The problems, data set level ones first, then by case id (file order within a case).

    Raises:
        DataError: The folder does not exist, matches no layout, or ``layout`` is unknown.
    """
    return examine_dataset(root, layout, read_values).problems


def examine_dataset(root: str | Path, layout: str = "auto", read_values: bool = True) -> DatasetCheck:
    """Check a data set folder: every problem, and how many cases were checked.

    Args:
        root: The data set folder.
        layout: One of ``LAYOUTS``, or ``"auto"`` to detect it as :func:`find_cases` does.
        read_values: See :func:`check_dataset`.

    Returns:
        The layout, the number of cases checked (each case id of each folder pair, labelled
        or not, with problems or not) and the problems.

    Raises:
        DataError: As :func:`check_dataset`.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Data folder {root} does not exist; pass the folder of a data set laid out as in {README}.")
    if layout == "auto":
        layout = detect_layout(root)
    findings = Findings(root)
    get_layout(layout).check(root, findings, read_values)
    problems = sorted(findings.problems, key=lambda problem: (problem.case is not None, problem.case or ""))
    errors = sum(problem.level == "error" for problem in problems)
    _logger.info(
        "%s (%s layout): %d cases, %d errors, %d warnings.", root, layout, len(findings.cases), errors, len(problems) - errors
    )
    return DatasetCheck(layout, len(findings.cases), problems, tuple(sorted(findings.cases)))
