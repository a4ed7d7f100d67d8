"""docs/benchmarks.md as sections between ``<!-- benchmark:KEY -->`` markers: each benchmark
script (and each machine) replaces its own section and keeps the others. No torch here, so
``scripts/benchmark_cli.py`` can use it without loading the stack it times."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_section"]


def write_section(path: Path, key: str, body: str) -> None:
    """Replace (or add) the section ``key`` of the page at ``path``, keeping the others."""
    begin, end = f"<!-- benchmark:{key} -->", f"<!-- /benchmark:{key} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else (
        "# Benchmarks\n\nWritten by `scripts/benchmark.py`; each machine's section is replaced when it is run "
        "again there.\n\n"
    )
    block = f"{begin}\n{body}{end}\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
