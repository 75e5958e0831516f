from __future__ import annotations

import pytest
from PIL import Image, ImageFont

from sd_lora.sampling.grid import BACKGROUND, ELLIPSIS, GAP, _wrap, make_grid

RED, BLUE = (255, 0, 0), (0, 0, 255)


def solid(w: int, h: int, color=RED) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def grid_of(w: int, h: int, rows: int, cols: int, title: str = "") -> Image.Image:
    cells = [[solid(w, h) for _ in range(cols)] for _ in range(rows)]
    return make_grid(cells, [f"prompt {r}" for r in range(rows)], [f"seed {c}" for c in range(cols)], title)


def has_ink(image: Image.Image, box: tuple[int, int, int, int]) -> bool:
    """True if some pixel in `box` is not the background colour."""
    region = image.crop(box)
    return region.getcolors(region.width * region.height) != [(region.width * region.height, BACKGROUND)]


# Expected sizes follow the rule in grid.py's docstring:
# 32 px cells: scale = ceil(128 / 32) = 4 -> slot 128; fs = clamp(128 // 16, 12, 32) = 12; lh = 15; pad = 6;
# label column = clamp(128, 120, 240) = 128; header = title = 15 + 2 * 6 = 27.
def test_small_cells_are_scaled_to_the_minimum_slot():
    assert GAP == 4
    assert grid_of(32, 32, rows=2, cols=3).size == (128 + 3 * (128 + 4) + 4, 27 + 2 * (128 + 4))
    assert grid_of(32, 32, rows=2, cols=3, title="step 100").size == (528, 27 + 27 + 2 * 132)


def test_large_cells_are_not_scaled():
    # 256 px: scale 1; fs = 16; lh = 20; pad = 8; label column = clamp(256, 160, 320) = 256; header = 36.
    assert grid_of(256, 256, rows=1, cols=1).size == (256 + 260 + 4, 36 + 260)
    # 1024 x 512: fs = clamp(512 // 16, 12, 32) = 32; label column = clamp(1024, 320, 640) = 640; header = 72.
    assert grid_of(1024, 512, rows=1, cols=2).size == (640 + 2 * 1028 + 4, 72 + 516)


def test_scale_is_one_integer_factor_from_the_longer_slot_side():
    # slot 48 x 32 -> scale ceil(128 / 48) = 3 -> 144 x 96; fs = 96 // 16 -> 12; label column = 144.
    grid = grid_of(48, 32, rows=1, cols=1)
    assert grid.size == (144 + 148 + 4, 27 + 100)
    # NEAREST: a 2x2 checker becomes exact 3x3-pixel blocks (the cell fills the slot, so no centring offset).
    checker = Image.new("RGB", (48, 32), RED)
    checker.putpixel((1, 0), BLUE)
    grid = make_grid([[checker]], ["p"], ["seed 0"])
    x0, y0 = 144 + GAP, 27
    for dx in range(3):
        for dy in range(3):
            assert grid.getpixel((x0 + dx, y0 + dy)) == RED
            assert grid.getpixel((x0 + 3 + dx, y0 + dy)) == BLUE


def test_cells_of_different_sizes_are_centred_in_their_slot():
    # row 0: 32x32 red; row 1: 16x32 blue (a prompt with its own --w). Slot 32x32 -> 128x128 after scale 4;
    # the blue cell becomes 64x128 and sits 32 px from the slot's left edge.
    cells = [[solid(32, 32, RED), solid(32, 32, RED)], [solid(16, 32, BLUE), solid(16, 32, BLUE)]]
    grid = make_grid(cells, ["wide", "narrow"], ["seed 0", "seed 1"])
    assert grid.size == (128 + 2 * 132 + 4, 27 + 2 * 132)
    for col in range(2):
        x = 128 + GAP + col * 132
        y0, y1 = 27, 27 + 132
        assert grid.getpixel((x, y0)) == RED and grid.getpixel((x + 127, y0 + 127)) == RED
        assert grid.getpixel((x + 31, y1 + 64)) == BACKGROUND
        assert grid.getpixel((x + 32, y1 + 64)) == BLUE
        assert grid.getpixel((x + 95, y1 + 64)) == BLUE
        assert grid.getpixel((x + 96, y1 + 64)) == BACKGROUND
        assert grid.getpixel((x + 64, y1)) == BLUE and grid.getpixel((x + 64, y1 + 127)) == BLUE


def test_labels_and_title_are_drawn():
    grid = grid_of(32, 32, rows=2, cols=2, title="step 100, ddim")
    title_h, header_h, label_w, slot = 27, 27, 128, 128
    assert has_ink(grid, (0, 0, grid.width, title_h))
    for col in range(2):
        x = label_w + GAP + col * (slot + GAP)
        assert has_ink(grid, (x, title_h, x + slot, title_h + header_h))
    for row in range(2):
        y = title_h + header_h + row * (slot + GAP)
        assert has_ink(grid, (0, y, label_w, y + slot))
    # without labels' text the same areas stay background (so the checks above can fail)
    blank = make_grid([[solid(32, 32)]], [""], [""])
    assert not has_ink(blank, (0, 0, 128, blank.height))


def test_long_labels_wrap_and_end_with_an_ellipsis():
    font = ImageFont.load_default(size=12)
    text = "a very long prompt " * 30 + "supercalifragilisticexpialidocious" * 4
    lines = _wrap(text, font, 116, max_lines=7)
    assert len(lines) == 7
    assert lines[-1].endswith(ELLIPSIS)
    assert all(font.getlength(line) <= 116 for line in lines)
    long_word = _wrap("x" * 200, font, 116, max_lines=50)
    assert all(font.getlength(line) <= 116 for line in long_word) and "".join(long_word) == "x" * 200
    assert _wrap("short prompt", font, 116, max_lines=3) == ["short prompt"]
    # and the grid draws it without spilling into the cells
    grid = make_grid([[solid(32, 32, BLUE)]], [text], ["seed 0" * 20], title="t" * 500)
    assert grid.size == (128 + 132 + 4, 27 + 27 + 132)


def test_accepts_other_image_modes():
    cells = [[Image.new("L", (32, 32), 0), Image.new("RGBA", (32, 32), (0, 0, 255, 255))]]
    grid = make_grid(cells, ["p"], ["a", "b"])
    assert grid.mode == "RGB"
    assert grid.getpixel((128 + GAP, 27)) == (0, 0, 0)
    assert grid.getpixel((128 + GAP + 132, 27)) == BLUE


def test_shape_mismatches_are_errors():
    with pytest.raises(ValueError, match="row labels"):
        make_grid([[solid(8, 8)]], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="column labels"):
        make_grid([[solid(8, 8)], [solid(8, 8), solid(8, 8)]], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="at least one"):
        make_grid([], [], [])
