"""The project's one image grid: rows of samples, each row named on its left, each column
optionally captioned on top, small images enlarged so a person can judge them.

Used by the trainer's validation grids, the evaluation report's teacher-above-student grid and the
offline world's one-row-per-class teacher grids. diffusers' `make_image_grid` has neither labels
nor enlargement, and the offline world's 32 px samples are unreadable at their own size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 128  # px: smaller images are enlarged by a whole factor, nearest-neighbour
CAPTION_HEIGHT = 14  # px, the default font's line plus a margin


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    *,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    pad: int = 2,
    min_tile: int = MIN_TILE,
) -> Image.Image:
    """One grid image. Every tile takes the first image's size (others are resized to it,
    bicubic), enlarged k× by nearest neighbours, k the smallest whole factor that brings its
    shorter side to `min_tile` (so pixels stay sharp squares); `pad` px of white between tiles.
    A row label goes left of its row, a column label (cut with "..." to fit) above its column."""
    if not rows or not rows[0]:
        raise ValueError("a grid needs at least one image")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    columns = max(len(row) for row in rows)
    if column_labels is not None and len(column_labels) != columns:
        raise ValueError(f"{len(column_labels)} column labels for {columns} columns")
    source_size = rows[0][0].size
    factor = max(1, math.ceil(min_tile / min(source_size)))
    width, height = source_size[0] * factor, source_size[1] * factor

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = (
        4 + max(int(probe.textlength(label, font=font)) for label in row_labels)
        if row_labels
        else 0
    )
    top = CAPTION_HEIGHT if column_labels else 0
    grid = Image.new(
        "RGB",
        (label_width + columns * (width + pad) + pad, top + len(rows) * (height + pad) + pad),
        "white",
    )
    draw = ImageDraw.Draw(grid)
    x0 = label_width + pad
    for r, images in enumerate(rows):
        y = top + pad + r * (height + pad)
        for c, image in enumerate(images):
            tile = image.convert("RGB")
            if tile.size != source_size:
                tile = tile.resize(source_size, Image.Resampling.BICUBIC)
            tile = tile.resize((width, height), Image.Resampling.NEAREST)
            grid.paste(tile, (x0 + c * (width + pad), y))
        if row_labels:
            draw.text((2, y + height // 2 - 5), row_labels[r], fill="black", font=font)
    for c, label in enumerate(column_labels or ()):
        x = x0 + c * (width + pad)
        draw.text((x + 1, 1), _fit(label, width - 2, draw, font), fill="black", font=font)
    return grid


def _fit(text: str, width: int, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont) -> str:
    """`text`, shortened with "..." until it is at most `width` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
