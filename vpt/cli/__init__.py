"""Command-line entry points (``vpt-train``, ``vpt-evaluate``; also ``scripts/*.py``)."""
