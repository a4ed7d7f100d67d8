#!/usr/bin/env python
"""Predict with a finished run: python scripts/predict.py run_dir=outputs/... input=scans/ output=masks/

Same as the installed `vpt-predict` command; `--help` lists the arguments.
"""

from vpt.cli.predict import main

if __name__ == "__main__":
    main()
