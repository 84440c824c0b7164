"""Command-line code, one module per command family; the library modules hold functions only.

Console scripts (pyproject.toml) point here. Imports of the heavy library modules stay inside the command
functions, so ``--help`` is fast and a command loads only what it needs.
"""
