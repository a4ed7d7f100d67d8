#!/usr/bin/env python
"""List every problem of a data set folder: python scripts/check_data.py data/my_set

Same as the installed `vpt-check-data` command; `--help` lists the arguments.
"""

from vpt.cli.check_data import main

if __name__ == "__main__":
    main()
