"""The toy world: seeded, captions describe exactly what is drawn, held-out pairs stay out of training."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sd_lora.demo import world


def test_same_seed_same_scene_caption_and_pixels():
    a_image, a_caption, a_scene = world.sample(123)
    b_image, b_caption, b_scene = world.sample(123)
    assert a_scene == b_scene and a_caption == b_caption
    assert np.array_equal(np.asarray(a_image), np.asarray(b_image))
    assert world.sample(124)[1:] != (a_caption, a_scene)


def test_images_are_64px_rgb():
    image, _, _ = world.sample(0)
    assert image.size == (64, 64) and image.mode == "RGB"


@pytest.mark.parametrize("seed", range(40))
def test_caption_names_every_object_and_the_background(seed):
    image, caption, scene = world.sample(seed)
    assert caption.endswith(f" {scene.background} background")
    for obj in scene.objects:
        assert (f"{obj.colour} {obj.shape}" if obj.colour else f" {obj.shape}") in caption
        assert (obj.size in caption.split()) or not obj.say_size
        assert (world.POSITION_PHRASES[obj.position] in caption) == obj.say_position
        assert scene.background not in world.colours_of(obj)
    pixels = np.asarray(image)
    corner = tuple(int(v) for v in pixels[0, 0])
    assert corner == world.COLOURS[scene.background]  # objects never reach the corners
    # every shape's colour is drawn: its centre pixel has exactly that colour (the second object never covers it)
    for obj in scene.objects:
        if obj.colour is not None:
            x, y = (int(c * 64) for c in obj.centre)
            assert tuple(int(v) for v in pixels[y, x]) == world.COLOURS[obj.colour]


@pytest.mark.parametrize("name", sorted(world.THINGS))
def test_a_thing_is_drawn_in_its_parts_colours(name):
    obj = world.SceneObject(name, None, "large", "centre", (0.5, 0.5), 0.5)
    scene = world.Scene("green" if name != "tree" else "blue", (obj,))
    pixels = np.asarray(world.render(scene)).reshape(-1, 3)
    drawn = {tuple(int(v) for v in p) for p in pixels}
    for colour in world.colours_of(obj):
        assert world.COLOURS[colour] in drawn, colour
    assert world.caption(scene).startswith(f"a {name} on ") or world.caption(scene).startswith(f"a large {name} on ")


def test_things_share_no_teal_and_no_orange_head_with_zkchar():
    """The base must not already know zkchar: no thing has its teal, and no orange part sits above another."""
    from sd_lora.demo import chars

    assert chars.PALETTE["body"] not in world.COLOURS.values()
    for name, parts in world.THINGS.items():
        for _, (_, _, _, bottom), colour in parts:
            if colour == "orange":
                assert not [box for _, box, _ in parts if box[1] >= bottom], f"{name}: a part below its orange part"


def test_training_scenes_mix_shapes_and_things():
    objects = [o for s in range(1000) for o in world.sample_scene(random.Random(s)).objects]
    things = [o for o in objects if o.colour is None]
    assert 0.3 < len(things) / len(objects) < 0.5
    assert {o.shape for o in things} == set(world.THINGS)
    assert all(o.colour is not None for s in range(50) for o in world.sample_scene(random.Random(s), "held-out").objects)


def test_captions_use_only_the_vocabulary():
    words = {w for seed in range(200) for w in world.sample(seed)[1].split()}
    assert words <= set(world.VOCABULARY)
    assert {"small", "large", "left", "centre", "and"} <= words


def test_two_object_scenes_do_not_overlap():
    scenes = [world.sample_scene(random.Random(s)) for s in range(300)]
    pairs = [s for s in scenes if len(s.objects) == 2]
    assert len(pairs) > 50
    for scene in pairs:
        a, b = scene.objects
        assert not world._overlap(a, b, margin=0.0)
        assert a.position != b.position and (a.colour or a.shape) != (b.colour or b.shape)


def test_held_out_pairs_never_appear_in_training_scenes():
    seen = {(o.colour, o.shape) for s in range(2000) for o in world.sample_scene(random.Random(s)).objects if o.colour}
    assert not seen & world.HELD_OUT_PAIRS
    assert len(seen) == len(world.COLOURS) * len(world.SHAPES) - len(world.HELD_OUT_PAIRS)


def test_held_out_split_and_prompts_use_only_held_out_pairs():
    for s in range(50):
        (obj,) = world.sample_scene(random.Random(s), "held-out").objects
        assert (obj.colour, obj.shape) in world.HELD_OUT_PAIRS
    prompts = world.held_out_prompts(backgrounds_per_pair=2)
    assert len(prompts) == 2 * len(world.HELD_OUT_PAIRS)
    for prompt, scene in prompts:
        (obj,) = scene.objects
        assert prompt == world.caption(scene) and (obj.colour, obj.shape) in world.HELD_OUT_PAIRS
        assert scene.background != obj.colour


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        world.sample_scene(random.Random(0), "test")


def test_random_pictures_are_seeded_and_varied():
    a = np.asarray(world.random_picture(random.Random(5)))
    assert np.array_equal(a, np.asarray(world.random_picture(random.Random(5))))
    assert not np.array_equal(a, np.asarray(world.random_picture(random.Random(6))))


def test_the_committed_regularisation_set_is_the_generators_output(tmp_path):
    from sd_lora.demo.defaults import REGULARIZATION_DIR

    names = world.write_regularization_set(tmp_path)
    assert sorted(p.name for p in REGULARIZATION_DIR.iterdir()) == sorted(names)
    assert len(names) == 240  # 120 pictures and their captions
    for name in names:
        assert (tmp_path / name).read_bytes() == (REGULARIZATION_DIR / name).read_bytes(), name
