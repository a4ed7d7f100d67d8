"""``key=value`` arguments of the tools that are not Hydra apps (evaluate, compare)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from vpt.errors import ConfigError

__all__ = ["key_value_arguments"]


def key_value_arguments(argv: Optional[Sequence[str]], tool: str, help_text: Optional[str]) -> list[tuple[str, str]]:
    """Parse ``argv`` (``sys.argv[1:]`` when None) as ``key=value`` pairs, in order.

    ``-h``/``--help`` prints ``help_text`` and exits 0.

    Raises:
        ConfigError: an argument without ``=``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(help_text)
        sys.exit(0)
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(f"Arguments must be key=value pairs, got {bad}; see {tool} --help.")
    return [tuple(a.split("=", 1)) for a in args]  # type: ignore[misc]
