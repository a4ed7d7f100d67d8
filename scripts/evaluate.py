#!/usr/bin/env python
"""Evaluate a finished run on a split: python scripts/evaluate.py run_dir=outputs/... split=test

Same as the installed `vpt-evaluate` command; `--help` lists the arguments.
"""

from vpt.cli.evaluate import main

if __name__ == "__main__":
    main()
