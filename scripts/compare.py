#!/usr/bin/env python
"""Compare finished runs in one table and chart: python scripts/compare.py runs=multirun/... [metric=test/dice]

Same as the installed `vpt-compare` command; `--help` lists the arguments.
"""

from vpt.cli.compare import main

if __name__ == "__main__":
    main()
