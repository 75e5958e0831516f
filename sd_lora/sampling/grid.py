"""Lay sample images out as one labelled grid: a row per prompt, a column per seed.

Layout rule (all sizes in pixels; `make_grid` follows it exactly, tests compute expected sizes from it):

- slot = the largest cell width x the largest cell height, over all cells.
- Every cell is scaled up by one integer factor `scale = max(1, ceil(MIN_SLOT_SIDE / max(slot sides)))`
  with NEAREST (pixel-exact, no blur), so 32 px previews become 128 px and labels don't dwarf them; the
  slot scales with it. A cell smaller than the slot (a prompt with its own --w/--h) is centred in it.
- font size `fs = clamp(min(slot sides) // 16, 12, 32)`, line height `lh = ceil(1.25 * fs)`,
  padding `pad = fs // 2`.
- label column width = slot width clamped to [10 fs, 20 fs]; header row height = title row height
  (only with a title) = `lh + 2 pad`.
- width  = label column + n_cols * (slot width + GAP) + GAP
  height = title row + header row + n_rows * (slot height + GAP)

The font is Pillow's built-in Aileron (offline); it has a limited character set, so non-ASCII prompt text
may show as boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

MIN_SLOT_SIDE = 128  # cells are scaled up by an integer factor until the slot's longer side reaches this
GAP = 4  # background between columns and below each row
BACKGROUND = (224, 224, 224)  # light neutral gray: distinguishes black and white images from the gaps
TEXT_COLOR = (20, 20, 20)
ELLIPSIS = "…"


@dataclass(frozen=True)
class _Layout:
    scale: int
    slot_w: int
    slot_h: int
    font_size: int
    line_h: int
    pad: int
    label_w: int
    header_h: int
    title_h: int
    width: int
    height: int

    def slot_origin(self, row: int, col: int) -> tuple[int, int]:
        x = self.label_w + GAP + col * (self.slot_w + GAP)
        y = self.title_h + self.header_h + row * (self.slot_h + GAP)
        return x, y


def _layout(cells: list[list[Image.Image]], n_cols: int, has_title: bool) -> _Layout:
    slot_w = max(c.width for row in cells for c in row)
    slot_h = max(c.height for row in cells for c in row)
    scale = max(1, math.ceil(MIN_SLOT_SIDE / max(slot_w, slot_h)))
    slot_w, slot_h = slot_w * scale, slot_h * scale
    font_size = min(max(min(slot_w, slot_h) // 16, 12), 32)
    line_h = math.ceil(font_size * 1.25)  # Aileron's ascent + descent
    pad = font_size // 2
    label_w = min(max(slot_w, 10 * font_size), 20 * font_size)
    header_h = line_h + 2 * pad
    title_h = header_h if has_title else 0
    return _Layout(
        scale=scale,
        slot_w=slot_w,
        slot_h=slot_h,
        font_size=font_size,
        line_h=line_h,
        pad=pad,
        label_w=label_w,
        header_h=header_h,
        title_h=title_h,
        width=label_w + n_cols * (slot_w + GAP) + GAP,
        height=title_h + header_h + len(cells) * (slot_h + GAP),
    )


def make_grid(
    cells: list[list[Image.Image]],
    row_labels: list[str],
    col_labels: list[str],
    title: str = "",
) -> Image.Image:
    """An RGB grid of `cells[row][col]` with the row labels (prompts) on the left, column labels (seeds) on
    top and an optional title line above; see the module docstring for the exact layout."""
    if not cells or not col_labels:
        raise ValueError("make_grid needs at least one row and one column")
    if len(row_labels) != len(cells):
        raise ValueError(f"{len(cells)} rows of cells but {len(row_labels)} row labels")
    for i, row in enumerate(cells):
        if len(row) != len(col_labels):
            raise ValueError(f"row {i} has {len(row)} cells but there are {len(col_labels)} column labels")

    layout = _layout(cells, len(col_labels), bool(title))
    grid = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _load_font(layout.font_size)
    pad, line_h = layout.pad, layout.line_h

    if title:
        draw.text((pad, pad), _ellipsize(title, font, layout.width - 2 * pad), font=font, fill=TEXT_COLOR)

    header_y = layout.title_h + pad
    for col, label in enumerate(col_labels):
        x, _ = layout.slot_origin(0, col)
        text = _ellipsize(label, font, layout.slot_w - 2 * pad)
        draw.text((x + (layout.slot_w - font.getlength(text)) / 2, header_y), text, font=font, fill=TEXT_COLOR)

    max_lines = max(1, (layout.slot_h - 2 * pad) // line_h)
    for row, (row_cells, label) in enumerate(zip(cells, row_labels)):
        _, y = layout.slot_origin(row, 0)
        lines = _wrap(label, font, layout.label_w - 2 * pad, max_lines)
        text_y = y + (layout.slot_h - len(lines) * line_h) // 2  # centred on the row
        for i, line in enumerate(lines):
            draw.text((pad, text_y + i * line_h), line, font=font, fill=TEXT_COLOR)

        for col, cell in enumerate(row_cells):
            x, y = layout.slot_origin(row, col)
            cell = cell.convert("RGB")
            if layout.scale > 1:
                cell = cell.resize((cell.width * layout.scale, cell.height * layout.scale), Image.Resampling.NEAREST)
            grid.paste(cell, (x + (layout.slot_w - cell.width) // 2, y + (layout.slot_h - cell.height) // 2))
    return grid


def _load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable Aileron, Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # fixed ~11 px bitmap font: small but legible


def _ellipsize(text: str, font, max_w: float, force: bool = False) -> str:
    """`text` cut to fit `max_w` with a trailing "…" (always ending in "…" when `force`)."""
    if not force and font.getlength(text) <= max_w:
        return text
    while text and font.getlength(text.rstrip() + ELLIPSIS) > max_w:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS


def _wrap(text: str, font, max_w: float, max_lines: int) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines; words wider than a line are split, overflow becomes "…"."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        if len(lines) > max_lines:
            break  # the rest would be cut anyway
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= max_w:
            current = candidate
            continue
        if current:
            lines.append(current)
        while font.getlength(word) > max_w and len(word) > 1:  # split an over-long word by characters
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > max_w:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _ellipsize(lines[-1], font, max_w, force=True)
    return lines


def side_by_side_grid(
    before: list[list[Image.Image]],
    after: list[list[Image.Image]],
    row_labels: list[str],
    seeds: list[int],
    names: tuple[str, str] = ("base", "LoRA"),
    title: str = "",
) -> Image.Image:
    """`before` and `after` (same prompts, same seeds) in one grid: for each seed a `names[0]` column and a
    `names[1]` column next to it, so every pair differs only in the model."""
    if len(before) != len(after) or any(len(b) != len(a) for b, a in zip(before, after)):
        raise ValueError("before and after must have the same rows and seeds")
    cells = [[image for pair in zip(b, a) for image in pair] for b, a in zip(before, after)]
    columns = [f"{name}, seed {seed}" for seed in seeds for name in names]
    return make_grid(cells, row_labels=row_labels, col_labels=columns, title=title)
