"""List every problem of a segmentation data set folder at once (like nnU-Net's dataset
integrity check).

    vpt-check-data DIR
    vpt-check-data root=DIR [layout=auto] [values=true]

``root`` is the data set folder; ``layout`` is auto (detected), nnunet (nnU-Net v2 and
Medical Segmentation Decathlon), synapse, folder2d or phantoms (the layout classes the
training loaders use, :mod:`vpt.data.medical.layouts`); ``values=false`` checks only file
names and headers, skipping the slow voxel checks (NaN/inf intensities, label values,
empty labels).

Every problem is printed on one line, grouped by case and starting with ERROR or WARNING,
then a summary ``C cases checked: N errors, M warnings in K cases`` (K: the cases with a
problem). The exit status is 1 when there is any
error, 0 when there are only warnings or nothing, and 2 when the folder cannot be checked
at all (missing, or no known layout).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vpt.cli.arguments import key_value_arguments
from vpt.cli.errors import exit_on_user_error
from vpt.errors import ConfigError

if TYPE_CHECKING:
    from vpt.data.medical.integrity import Problem

__all__ = ["format_problems", "main"]

_logger = logging.getLogger("vpt.check_data")

_TOOL = "vpt-check-data"
_KEYS = ("root", "layout", "values")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _parse(argv: Sequence[str] | None) -> dict[str, str]:
    """The tool's arguments; a single bare argument (no ``=``, no leading ``-``) is ``root``."""
    args = list(sys.argv[1:] if argv is None else argv)
    positional = [arg for arg in args if "=" not in arg and not arg.startswith("-")]
    # The rest goes through the shared parser, which also answers --help and rejects other flags.
    options = dict(key_value_arguments([arg for arg in args if arg not in positional], _TOOL, __doc__))
    unknown = sorted(set(options) - set(_KEYS))
    if unknown:
        raise ConfigError(f"{_TOOL} does not know {unknown}; it takes root=, layout= and values= (see {_TOOL} --help).")
    if len(positional) > 1 or (positional and "root" in options):
        raise ConfigError(f"{_TOOL} checks one folder, got {positional + [options.get('root', '')]}; pass one DIR.")
    if positional:
        options["root"] = positional[0]
    if not options.get("root"):
        raise ConfigError(f"No data folder given; run {_TOOL} DIR (or root=DIR).")
    values = options.get("values", "true").lower()
    if values not in _TRUE + _FALSE:
        raise ConfigError(f"values must be true or false, got {options['values']!r}.")
    options["values"] = "true" if values in _TRUE else "false"
    return options


def format_problems(problems: Sequence[Problem], cases_checked: int | None = None) -> list[str]:
    """The report's lines: one per problem, grouped by case, then the summary.

    Args:
        problems: As :func:`check_dataset` returns them (data set level first, then by case).
        cases_checked: How many cases were checked, for the summary (left out when ``None``).

    Returns:
        Lines like ``ERROR    case_003  size_mismatch: ...`` and
        ``12 cases checked: 2 errors, 1 warning in 2 cases``.
    """
    lines = []
    width = max((len(problem.case or "") for problem in problems), default=0)
    for problem in sorted(problems, key=lambda problem: (problem.case is not None, problem.case or "")):
        # Data set level problems (dataset.json, stray files) have no case; "-" keeps the columns.
        case = (problem.case or "-").ljust(max(width, 1))
        lines.append(f"{problem.level.upper():<8} {case}  {problem.kind}: {problem.message}")
    errors = sum(problem.level == "error" for problem in problems)
    warnings = len(problems) - errors
    cases = len({problem.case for problem in problems if problem.case is not None})
    checked = "" if cases_checked is None else f"{cases_checked} case{'s' * (cases_checked != 1)} checked: "
    # "in 0 cases" would read as if no case had been looked at.
    where = f" in {cases} case{'s' * (cases != 1)}" if cases else ""
    lines.append(f"{checked}{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}{where}")
    return lines


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``vpt-check-data DIR``): print the problems, exit 1 on any error.

    Args:
        argv: The arguments, ``sys.argv[1:]`` when ``None``.
    """
    options = _parse(argv)
    # The readers (and, through vpt.data, torch) load only once the arguments are checked.
    from vpt.data.medical.integrity import examine_dataset

    logging.basicConfig(level=logging.WARNING, format="[%(name)s][%(levelname)s] - %(message)s")
    root = Path(options["root"])
    report = examine_dataset(root, options.get("layout", "auto"), read_values=options["values"] == "true")
    problems = report.problems
    print(f"Checked {root} ({report.layout} layout)")
    for line in format_problems(problems, report.cases):
        print(line)
    sys.stdout.flush()
    if any(problem.level == "error" for problem in problems):
        sys.exit(1)


if __name__ == "__main__":
    main()
