#!/usr/bin/env python
"""Train a prompted backbone: python scripts/train.py model=vit_b method=vpt_deep task=...

Same as the installed `vpt-train` command; see README.md and `--help` for the config groups.
"""

from vpt.cli.train import main

if __name__ == "__main__":
    main()
