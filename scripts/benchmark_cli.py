#!/usr/bin/env python
"""Start-up time of the command-line tools: ``<tool> --help`` and one argument error each.

Every console script in ``pyproject.toml`` ([project.scripts]) runs in a fresh process,
``--repeats`` times per command, interleaved; the table gives the median wall-clock time
with the spread (min-max) and the exit code. None of these commands needs torch, so each
should answer in well under two seconds (before the heavy imports were deferred, each took
11-16 s on the 2-core development machine). The commands run in an empty temporary folder,
so an argument error cannot write into the checkout.

    python scripts/benchmark_cli.py                              # every tool, 5 repeats, into docs/benchmarks.md
    python scripts/benchmark_cli.py --tools vpt-predict --repeats 1 --out /tmp/bench.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Optional, Sequence

from benchmark_page import write_section  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parents[1]
SECTION = "cli-startup"

#: One argument error per tool, each refused before anything heavy is imported.
ARGUMENT_ERRORS: dict[str, list[str]] = {
    "vpt-train": ["--no-such-flag"],
    "vpt-evaluate": ["split=bogus"],
    "vpt-compare": ["--no-such-flag"],
    "vpt-predict": ["output=out"],  # no input=
    "vpt-check-data": [],  # no data folder
}


def console_scripts(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """``{tool: "module:function"}`` from ``[project.scripts]``."""
    return dict(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["scripts"])


def tool_command(tool: str, target: str) -> list[str]:
    """The installed console script beside this interpreter, or ``python -m <module>``."""
    installed = Path(sys.executable).parent / tool
    if installed.is_file():
        return [str(installed)]
    return [sys.executable, "-m", target.split(":", 1)[0]]


def time_command(command: Sequence[str], cwd: Path) -> tuple[float, int]:
    """Wall-clock seconds and exit code of one run (output discarded)."""
    started = time.perf_counter()
    result = subprocess.run(list(command), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started, result.returncode


def measure(tools: Sequence[str], repeats: int) -> list[tuple[str, str, float, float, float, int]]:
    """Rows ``(shown command, what it checks, median s, min s, max s, exit code)``, two per tool."""
    scripts = console_scripts()
    unknown = sorted(set(tools) - set(scripts))
    if unknown:
        raise SystemExit(f"Unknown tools {unknown}; the console scripts are {sorted(scripts)}.")
    cases = []
    for tool in tools:
        command = tool_command(tool, scripts[tool])
        cases.append((f"{tool} --help", "help", command + ["--help"]))
        error = ARGUMENT_ERRORS.get(tool, ["--no-such-flag"])
        cases.append((" ".join([tool, *error]), "argument error", command + error))
    times: dict[str, list[float]] = {shown: [] for shown, _, _ in cases}
    codes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="vpt-cli-bench-") as folder:
        for _ in range(repeats):  # interleaved, so a busy moment does not fall on one command
            for shown, _, command in cases:
                seconds, codes[shown] = time_command(command, Path(folder))
                times[shown].append(seconds)
    return [
        (shown, kind, statistics.median(times[shown]), min(times[shown]), max(times[shown]), codes[shown])
        for shown, kind, _ in cases
    ]


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def report(rows: Sequence[tuple[str, str, float, float, float, int]], repeats: int, command_line: str) -> str:
    """The markdown section: a heading, how it was measured, the table."""
    lines = [
        "## Command-line start-up",
        "",
        f"`{command_line}` — {_machine()}, {time.strftime('%Y-%m-%d')}.",
        f"Wall clock of a fresh process, {repeats} interleaved repeats; median (min-max).",
        "",
        "| command | answers | exit code | seconds |",
        "|---|---|---|---|",
        *(f"| `{shown}` | {kind} | {code} | {median:.2f} ({low:.2f}-{high:.2f}) |" for shown, kind, median, low, high, code in rows),
    ]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", nargs="+", default=None, help="console scripts to time (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="the page whose 'Command-line start-up' section is replaced (written only if it exists)")
    args = parser.parse_args(argv)
    tools = args.tools or list(console_scripts())
    rows = measure(tools, max(1, args.repeats))
    shown_args = " ".join(sys.argv[1:] if argv is None else argv)
    body = report(rows, max(1, args.repeats), f"python scripts/benchmark_cli.py {shown_args}".strip())
    print(body)
    if args.out.exists():
        write_section(args.out, SECTION, body)
        print(f"Written to {args.out}")


if __name__ == "__main__":
    main()
