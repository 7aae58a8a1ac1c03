"""Every path the project reads or writes, in one place (showyourwork style).

Generated folders (``runs/``, ``_build/``, ``book/runs/``, the model cache) are
gitignored. Set ``EVIL_MOE_CACHE`` to move the cache and ``EVIL_MOE_RUNS`` to
move the runs folder.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout this package was installed from (editable install)."""

PACKAGE_DIR = Path(__file__).resolve().parent
"""The library's source (``evil_moe/``); its digest is part of every pipeline step's inputs."""
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PRESETS_DIR = NOTEBOOKS_DIR / "params"
DATA_DIR = REPO_ROOT / "data"
PAIRS_FILE = DATA_DIR / "pairs" / "hack_pairs.md"
BOOK_DIR = REPO_ROOT / "book"
BOOK_RUNS_DIR = BOOK_DIR / "runs"
BUILD_DIR = REPO_ROOT / "_build"


def cache_dir() -> Path:
    """Model and dataset cache: ``$EVIL_MOE_CACHE`` or ``~/.cache/evil_moe``."""
    return Path(os.environ.get("EVIL_MOE_CACHE", Path.home() / ".cache" / "evil_moe"))


def runs_dir() -> Path:
    """Where pipeline runs land: ``$EVIL_MOE_RUNS`` or ``<repo>/runs``."""
    return Path(os.environ.get("EVIL_MOE_RUNS", REPO_ROOT / "runs"))


def run_dir(preset: str, arm: str, seed: int, root: Path | None = None) -> Path:
    """``runs/<preset>/<arm>-s<seed>/``: one arm and seed of one preset."""
    return (root or runs_dir()) / preset / f"{arm}-s{seed}"
