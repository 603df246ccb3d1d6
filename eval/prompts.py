"""Prompt sets for evaluation: a text file, BK-SDM's COCO-30K captions, or Fashion-MNIST classes.

`load_prompts(spec, num)` accepts:
  - `coco30k`: 30,000 MS-COCO val2014 captions, BK-SDM's protocol. Nothing can be downloaded
    offline, so the captions come from a local file given as `coco_captions=` or in
    `$SD_DISTILL_COCO_CAPTIONS`: BK-SDM's `data/mscoco_val2014_30k/metadata.csv` (columns
    `file_name,text`; exactly their 30K), COCO's `captions_val2014.json` (one caption per image:
    the lowest annotation id, images by id), or a text file with one caption per line;
  - a registered prompt set (entry point group `sd_distill.prompt_sets`, `(num, seed) -> list`):
    the offline world's `fashion`, captions of the 10 Fashion-MNIST classes ("a photo of a
    Dress", ...), class-balanced (class i at positions i, i+10, ...), the same templates its
    training captions use;
  - anything else: a text file, one prompt per line (blank lines skipped).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from core.errors import UserInputError
from core.plugins import PROMPT_SETS, registered

COCO30K = "coco30k"
COCO_CAPTIONS_ENV = "SD_DISTILL_COCO_CAPTIONS"
COCO30K_SIZE = 30_000
PROMPT_SET_DEFAULT_SIZE = 100  # a registered set's size when none is asked for


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line, stripped; blank lines skipped. Empty or unreadable → UserInputError."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read prompts file {str(path)!r}: {error}") from error
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserInputError(f"prompts file {str(path)!r} has no prompts")
    return prompts


def coco_captions(path: str | Path) -> list[str]:
    """All captions of a local COCO captions file (.csv, .json or .txt; see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"COCO captions file {str(path)!r} does not exist")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        column = next((c for c in ("text", "caption") if rows and c in rows[0]), None)
        if column is None:
            raise UserInputError(f"{str(path)!r} needs a 'text' or 'caption' column")
        return [row[column].strip() for row in rows]
    if path.suffix == ".json":
        try:
            annotations = json.loads(path.read_text(encoding="utf-8"))["annotations"]
        except (ValueError, KeyError, TypeError) as error:
            raise UserInputError(f"{str(path)!r} is not a COCO captions json") from error
        first_caption: dict[int, tuple[int, str]] = {}
        for note in annotations:
            known = first_caption.get(note["image_id"])
            if known is None or note["id"] < known[0]:
                first_caption[note["image_id"]] = (note["id"], note["caption"].strip())
        return [first_caption[image_id][1] for image_id in sorted(first_caption)]
    return read_prompt_file(path)


def coco30k_prompts(captions_path: str | Path | None = None, num: int = COCO30K_SIZE) -> list[str]:
    """The first `num` captions of the local COCO val2014 captions file (BK-SDM: 30K)."""
    path = captions_path or os.environ.get(COCO_CAPTIONS_ENV)
    if not path:
        raise UserInputError(
            f"{COCO30K} needs MS-COCO val2014 captions, which cannot be downloaded offline: pass a "
            f"captions file or set {COCO_CAPTIONS_ENV} to BK-SDM's metadata.csv, COCO's "
            "captions_val2014.json or a one-caption-per-line text file"
        )
    captions = coco_captions(path)
    if len(captions) < num:
        raise UserInputError(f"{str(path)!r} has {len(captions)} captions, fewer than {num}")
    return captions[:num]


def load_prompts(
    spec: str | Path,
    num: int | None = None,
    *,
    seed: int = 0,
    coco_captions_path: str | Path | None = None,
) -> list[str]:
    """The prompt list for `spec` (module docstring). With `num`, a file's prompts repeat in order
    until there are `num` of them (each repeat gets its own seed at generation time)."""
    if num is not None and num < 1:
        raise UserInputError(f"number of prompts must be positive, got {num}")
    if str(spec) == COCO30K:
        return coco30k_prompts(coco_captions_path, num or COCO30K_SIZE)
    prompt_sets = registered(PROMPT_SETS)
    if str(spec) in prompt_sets:
        return prompt_sets[str(spec)].load()(num or PROMPT_SET_DEFAULT_SIZE, seed)
    prompts = read_prompt_file(spec)
    if num is None:
        return prompts
    return [prompts[i % len(prompts)] for i in range(num)]
