"""The demo evaluator's pixel scoring, on synthetic images whose answer is known."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sd_lora.demo import chars, evaluate, world


def scene_image(shape: str, colour: str, background: str, centre=(0.5, 0.5), side=0.45) -> Image.Image:
    obj = world.SceneObject(shape, colour, "large", "centre", centre, side)
    return world.render(world.Scene(background, (obj,)))


def character_image(background=(170, 205, 240), flip=False, size=(96, 64)) -> Image.Image:
    image = Image.new("RGB", size, background)
    chars.draw_character(ImageDraw.Draw(image), (size[0] / 2, size[1] / 2 + 4), min(size) * 0.7, 0.1, 0.6)
    return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM) if flip else image


def test_nearest_colour_and_border_colour():
    assert evaluate.nearest_colour((250, 10, 20)) == "red"
    assert evaluate.nearest_colour((200, 200, 210)) == "white"
    image = scene_image("square", "black", "yellow", side=0.5)
    assert evaluate.border_colour(image) == "yellow"


@pytest.mark.parametrize("shape", world.SHAPES)
def test_read_scene_recovers_every_shape_at_other_sizes_and_places(shape):
    for colour, background, centre, side in (("red", "blue", (0.4, 0.6), 0.3), ("white", "black", (0.55, 0.45), 0.6)):
        reading = evaluate.read_scene(scene_image(shape, colour, background, centre, side))
        assert reading == evaluate.SceneReading(background, colour, shape)


def test_read_scene_of_rendered_world_scenes():
    for seed in range(30):
        image, _, scene = world.sample(seed, "held-out")
        (obj,) = scene.objects
        assert evaluate.read_scene(image) == evaluate.SceneReading(scene.background, obj.colour, obj.shape)


def test_blurred_shapes_are_still_read():
    from PIL import ImageFilter

    for shape in world.SHAPES:
        blurred = scene_image(shape, "green", "purple").filter(ImageFilter.GaussianBlur(1.5))
        assert evaluate.read_scene(blurred).shape == shape


def test_no_object_and_noise_are_not_a_shape():
    empty = Image.new("RGB", (64, 64), world.COLOURS["green"])
    assert evaluate.read_scene(empty) == evaluate.SceneReading("green", None, None)


def test_character_found_in_training_style_images_and_not_elsewhere():
    assert evaluate.read_character(character_image()).present
    assert evaluate.read_character(character_image(background=world.COLOURS["red"], size=(64, 64))).present
    upside_down = evaluate.read_character(character_image(flip=True))
    assert upside_down.body > evaluate.MIN_BODY_FRACTION and not upside_down.present
    # the world has orange but no teal: an orange circle above a green square is not the character
    image = Image.new("RGB", (64, 64), world.COLOURS["white"])
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 4, 44, 28), fill=world.COLOURS["orange"])
    draw.rectangle((16, 30, 48, 60), fill=world.COLOURS["green"])
    assert not evaluate.read_character(image).present
    assert not any(evaluate.read_character(world.sample(s)[0]).present for s in range(100))


def test_concept_score_is_the_fraction_found():
    images = [character_image(), character_image(flip=True), Image.new("RGB", (64, 64)), character_image(size=(64, 96))]
    assert evaluate.concept_score(images) == pytest.approx(0.5)


def test_training_images_are_resized_and_all_show_the_character(tmp_path):
    chars.generate(tmp_path, count=6, seed=3)
    images = evaluate.training_images(tmp_path)
    assert len(images) == 6
    assert all(abs(im.width * im.height - 64 * 64) < 400 for im in images)
    assert evaluate.concept_score(images) == 1.0


def test_mean_abs_difference():
    black, white = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 255, 255))
    assert evaluate.mean_abs_difference(black, black) == 0.0
    assert evaluate.mean_abs_difference(black, white) == pytest.approx(1.0)
    half = np.zeros((8, 8, 3), np.uint8)
    half[:4] = 255
    assert evaluate.mean_abs_difference(black, Image.fromarray(half)) == pytest.approx(0.5)


def test_score_fidelity_counts_each_attribute_against_the_prompted_scene():
    scene = world.Scene("blue", (world.SceneObject("circle", "green", "large", "centre", (0.5, 0.5), 0.45),))
    readings = [
        evaluate.SceneReading("blue", "green", "circle"),  # all right
        evaluate.SceneReading("blue", "green", "square"),  # wrong shape
        evaluate.SceneReading("red", None, None),  # nothing right
        evaluate.SceneReading("blue", "yellow", "circle"),  # wrong colour
    ]
    report = evaluate.score_fidelity(readings, [scene] * 4)
    assert (report.background, report.colour, report.shape, report.all_three) == (0.75, 0.5, 0.5, 0.25)
    assert report.chance["shape"] == pytest.approx(1 / len(world.SHAPES))
    assert "chance" in evaluate.format_base_report(report)


def test_random_scenes_are_not_misread_as_held_out_answers():
    """Guard against a scorer that always answers the same: readings of varied scenes vary."""
    readings = {evaluate.read_scene(world.sample(s)[0]).shape for s in range(60)}
    assert readings == set(world.SHAPES)
    rng = random.Random(0)
    assert len({evaluate.border_colour(world.render(world.sample_scene(rng))) for _ in range(60)}) == len(world.COLOURS)


def test_erode_removes_thin_lines_and_keeps_blobs():
    mask = np.zeros((10, 10), bool)
    mask[1, :] = True  # a one-pixel line
    mask[4:8, 4:8] = True  # a 4x4 blob
    eroded = evaluate.erode(mask)
    assert not eroded[1].any()
    assert eroded[5:7, 5:7].all() and eroded.sum() == 4


def test_comparison_grid_puts_base_and_lora_side_by_side():
    cell = Image.new("RGB", (64, 64))
    report = evaluate.LoraReport(0, 1, 1, 1, 1, 0.01, 0.1, images={
        "prompts": [["zkchar"], ["a red circle on a blue background"]],
        "base": [[cell, cell], [cell, cell]],
        "lora": [[cell, cell], [cell, cell]],
    })
    grid = evaluate.comparison_grid(report)
    assert grid.width > 4 * 64 and grid.height > 2 * 64


def test_a_missing_lora_file_is_refused_before_the_base_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: pytest.fail("the base model was loaded"))
    assert evaluate.main([str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors: no such LoRA file" in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_run_learns_zkchar_and_keeps_the_world(tmp_path):
    """The main command with no flag but --output-dir, measured: where the base drew no zkchar for the trigger
    word, the LoRA draws it (teal body, orange head above) in most images; named backgrounds still appear;
    other prompts barely move."""
    from sd_lora.train import main

    assert main(["--data", str(evaluate.CHARS_DIR), "--output-dir", str(tmp_path), "--sample-every", "0"]) == 0
    settings = evaluate.GenerationSettings(seeds=(0, 1, 2))
    report = evaluate.evaluate_lora(tmp_path / "chars.safetensors", settings=settings)
    print(evaluate.format_lora_report(report, settings))  # the numbers, with -s
    assert report.concept_training == 1.0 and report.concept_base == 0.0 and report.alone_base == 0.0
    assert report.alone_lora >= 2 / 3 and report.concept_lora > 0.1  # measured: 100% alone, 17% of all trigger images, drift 0.073
    assert report.teal_base == 0.0 and report.teal_lora > 0.01
    assert report.fidelity_lora >= 0.9
    assert report.drift < report.seed_to_seed


def test_bad_settings_are_refused_before_the_base_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: pytest.fail("the base model was loaded"))
    assert evaluate.main(["--seeds", "0", "--steps", "0", "--cfg", "nan"]) == 2
    err = capsys.readouterr().err
    assert "--seeds 0: evaluate at least one seed" in err and "--steps 0: sample with at least one step" in err
    assert "--cfg nan: use a finite guidance scale" in err


def test_a_one_seed_report_says_why_it_has_no_seed_to_seed_scale():
    report = evaluate.LoraReport(**{f.name: 0.0 for f in dataclasses.fields(evaluate.LoraReport) if f.name != "images"},
                                 images={})
    text = evaluate.format_lora_report(dataclasses.replace(report, seed_to_seed=float("nan")),
                                       evaluate.GenerationSettings(seeds=(0,)))
    assert "nan" not in text and "one seed: with --seeds 2 or more" in text


def test_a_grid_without_a_lora_file_or_with_an_unknown_extension_is_refused_before_the_base_loads(tmp_path, capsys, monkeypatch):
    # --grid was silently ignored without FILE, and a name PIL cannot write failed after the whole evaluation
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: pytest.fail("the base model was loaded"))
    assert evaluate.main(["--grid", str(tmp_path / "g.png")]) == 2
    assert "--grid " + str(tmp_path / "g.png") + ": the grid shows base and LoRA side by side; give a LoRA FILE too" in capsys.readouterr().err
    assert evaluate.main([str(tmp_path / "x.safetensors"), "--grid", str(tmp_path / "grid")]) == 2
    assert "grid: not an image file name PIL can write; end it in .png" in capsys.readouterr().err


def test_the_grid_goes_into_a_folder_that_does_not_exist_yet(tmp_path, capsys, monkeypatch):
    """The grid is saved after minutes of generation: a missing folder must not end the run in a traceback."""
    cell = Image.new("RGB", (64, 64))
    report = evaluate.LoraReport(0, 1, 1, 1, 1, 0.01, 0.1, images={"prompts": [["zkchar"]], "base": [[cell]], "lora": [[cell]]})
    monkeypatch.setattr(evaluate, "evaluate_lora", lambda *a, **k: report)
    grid = tmp_path / "new" / "folder" / "grid.png"
    assert evaluate.main([str(tmp_path / "x.safetensors"), "--seeds", "1", "--grid", str(grid)]) == 0
    assert f"grid: {grid}" in capsys.readouterr().out
    assert Image.open(grid).size == evaluate.comparison_grid(report).size
