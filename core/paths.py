"""Where the toolkit keeps things between runs."""

from __future__ import annotations

import os
import re
from pathlib import Path


def default_cache_root() -> Path:
    """`$SD_DISTILL_CACHE`, else `~/.cache/sd-distill`: latent caches, converted weights, stats."""
    return Path(os.environ.get("SD_DISTILL_CACHE", Path.home() / ".cache" / "sd-distill"))


# A hub repository id, `owner/name`: how a value that is not a local path may name a model.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
