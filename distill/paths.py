"""Where the toolkit keeps things between runs."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_root() -> Path:
    """`$SD_DISTILL_CACHE`, else `~/.cache/sd-distill`: latent caches, converted weights, stats."""
    return Path(os.environ.get("SD_DISTILL_CACHE", Path.home() / ".cache" / "sd-distill"))
