"""The README picture: a run's step grids, spread and pasted side by side."""

import pytest
from PIL import Image

from sd_lora.demo.figure import main, progression, spread, step_grids


def test_spread_keeps_first_and_last_evenly():
    assert spread(list(range(7)), 4) == [0, 2, 4, 6]
    assert spread([1, 2], 4) == [1, 2] and spread(list(range(5)), 1) == [4]


def test_step_grids_sorted_by_step_without_the_comparison(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("zk-step00000100.png", "zk-step00000000.png", "zk-compare-step00000100.png", "notes.png"):
        Image.new("RGB", (10, 10)).save(samples / name)
    assert [p.name for p in step_grids(tmp_path)] == ["zk-step00000000.png", "zk-step00000100.png"]


def test_progression_scales_to_height_and_pastes_in_order(tmp_path):
    red, blue = Image.new("RGB", (100, 50), "red"), Image.new("RGB", (40, 40), "blue")
    out = progression([red, blue], height=100, gap=8)
    assert out.size == (200 + 8 + 100, 100)
    assert out.getpixel((10, 10)) == (255, 0, 0) and out.getpixel((250, 50)) == (0, 0, 255)


def test_cli_writes_the_picture_or_explains(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "x.png")]) == 2
    assert "no step grids" in capsys.readouterr().err
    (tmp_path / "samples").mkdir()
    for step in (0, 50, 100):
        Image.new("RGB", (60, 30), "white").save(tmp_path / "samples" / f"c-step{step:08d}.png")
    assert main([str(tmp_path), str(tmp_path / "fig" / "p.png"), "--height", "60"]) == 0
    assert Image.open(tmp_path / "fig" / "p.png").size == (3 * 120 + 2 * 8, 60)


def test_cli_refuses_columns_or_height_below_one(tmp_path, capsys):
    # they failed with PIL's ValueError traceback ("Width and height must be >= 0") once the grids were read
    (tmp_path / "samples").mkdir()
    Image.new("RGB", (60, 30), "white").save(tmp_path / "samples" / "c-step00000000.png")
    for args, message in ((["--columns", "0"], "--columns 0: must be 1 or more"), (["--height", "-5"], "--height -5: must be 1 or more")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path), str(tmp_path / "p.png"), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
