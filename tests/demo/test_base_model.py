"""The committed demo base model: small, loads through the normal path, and follows world prompts."""

from __future__ import annotations

import json

import pytest
import torch

from sd_lora.demo import BASE_MODEL_DIR, chars, world
from sd_lora.demo.pretrain import tokenizer_words
from sd_lora.models.load import load_base_model

MAX_BYTES = 25 * 10**6


@pytest.fixture(scope="module")
def base():
    return load_base_model(str(BASE_MODEL_DIR))


def test_committed_weights_are_at_most_25_mb():
    files = [p for p in BASE_MODEL_DIR.rglob("*") if p.is_file()]
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES


def test_loads_as_an_fp32_sd1_epsilon_model_at_64px(base):
    assert (base.family, base.prediction_type) == ("sd1", "epsilon")
    assert base.native_resolution == 64 and base.vae_scale_factor == 4
    for module in (base.unet, base.vae, base.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    scheduler = json.loads((BASE_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert 0.05 < base.vae.config.scaling_factor < 5  # measured after VAE training, not the 0.18215 default


def test_vae_maps_64px_to_16x16x4_and_back(base):
    image, _, _ = world.sample(0)
    pixels = torch.from_numpy(__import__("numpy").asarray(image, dtype="float32")).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        latents = base.vae.encode(pixels).latent_dist.mean
        decoded = base.vae.decode(latents).sample
    assert latents.shape == (1, 4, 16, 16)
    assert (decoded - pixels).abs().mean() < 0.1  # reconstructs a world scene closely


def test_every_world_and_dataset_word_is_one_token(base):
    assert set(world.VOCABULARY) | set(chars.caption_words()) <= set(tokenizer_words())
    for word in tokenizer_words():
        ids = base.tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)


def test_follows_background_and_colour_words():
    """A few held-out prompts, one seed: the named background and object colour appear."""
    from sd_lora.demo import evaluate

    pipe, _ = evaluate.load_pipeline(BASE_MODEL_DIR)
    items = world.held_out_prompts(backgrounds_per_pair=1, seed=1)
    cells = evaluate.generate(pipe, [p for p, _ in items], evaluate.GenerationSettings(seeds=(0,), steps=15))
    readings = [evaluate.read_scene(row[0]) for row in cells]
    backgrounds = sum(r.background == s.background for r, (_, s) in zip(readings, items))
    colours = sum(r.colour == s.objects[0].colour for r, (_, s) in zip(readings, items))
    assert backgrounds >= len(items) - 1 and colours >= len(items) - 2, readings


def test_draws_held_out_shapes_well_above_chance():
    """Shapes it never saw in those colours (a green circle, a white cross, ...), 20 images: chance is 25%."""
    from sd_lora.demo import evaluate

    pipe, _ = evaluate.load_pipeline(BASE_MODEL_DIR)
    items = world.held_out_prompts(backgrounds_per_pair=2, seed=2)
    cells = evaluate.generate(pipe, [p for p, _ in items], evaluate.GenerationSettings(seeds=(0, 1), steps=20))
    report = evaluate.score_fidelity([evaluate.read_scene(im) for row in cells for im in row],
                                     [scene for _, scene in items for _ in range(2)])
    assert report.images == 20
    assert report.shape >= 0.4 and report.colour >= 0.9, report


def test_draws_things_in_their_colours():
    """Things are one word for several coloured parts: "a large house" gives its yellow wall in every image and
    its red roof in some (thin parts such as the tree's trunk are beyond this 64 px model)."""
    import numpy as np

    from sd_lora.demo import evaluate

    pipe, _ = evaluate.load_pipeline(BASE_MODEL_DIR)
    things = {"house": "blue", "mushroom": "blue", "flag": "green"}
    cells = evaluate.generate(pipe, [f"a large {name} on a {bg} background" for name, bg in things.items()],
                              evaluate.GenerationSettings(seeds=(0, 1, 2), steps=20))
    for name, row in zip(things, cells):
        shares = []
        for image in row:
            labels = np.argmin(evaluate.colour_distances(evaluate.as_array(image)), axis=-1)
            shares.append({colour: float((labels == i).mean()) for i, colour in enumerate(world.COLOURS)})
        parts = world.THINGS[name]
        area = {"rect": 1.0, "ellipse": np.pi / 4, "triangle": 0.5}  # of the part's box
        largest = max(parts, key=lambda part: area[part[0]] * (part[1][2] - part[1][0]) * (part[1][3] - part[1][1]))[2]
        assert all(s[largest] > 0.025 for s in shares), (name, largest, shares)
        for colour in {part[2] for part in parts}:
            assert max(s[colour] for s in shares) > 0.01, (name, colour, shares)
