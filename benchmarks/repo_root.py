"""How every benchmark finds the repository: run as `python benchmarks/NAME.py`, only benchmarks/ is on sys.path,
so a benchmark starts with

    if __package__ in (None, ""):  # run as a script: put the repository on sys.path
        import repo_root  # noqa: F401

and then imports `chatbot`, `training`, `tools` and `benchmarks.*` as the tests do (they import `benchmarks.NAME`,
with the repository already on sys.path). The repository's path is `training.paths.REPO_ROOT`.
"""
from __future__ import annotations

import sys
from pathlib import Path

_here = str(Path(__file__).resolve().parent.parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
