#!/usr/bin/env python
"""Export a finished run as a model folder: python scripts/export.py run_dir=outputs/... output=models/name

Same as the installed `vpt-export` command; `--help` lists the arguments.
"""

from vpt.cli.export import main

if __name__ == "__main__":
    main()
