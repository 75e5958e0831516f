"""`python -m sd_lora.demo.evaluate [FILE]`: measure the demo base model and a zkchar LoRA with pixel analysis.

Without FILE: the base's prompt fidelity on held-out world prompts (colour/shape pairs it never saw drawn):
background colour, object colour and shape, each against chance.

With FILE (a LoRA `.safetensors` trained on `datasets/chars`), the same seeds with and without the LoRA:

- concept score: the fraction of trigger-prompt images in which the character is found (a teal body with
  an orange head above it), next to the same measure on the training images;
- prompt fidelity: with "zkchar ... on a red background" (backgrounds the dataset never shows), the fraction
  of images whose border is the named colour;
- prior drift: mean absolute pixel change (0-1) on prompts without the trigger, against the base, beside the
  change between two seeds of the base for scale.

Scoring works on RGB arrays and is pure: nearest named colour, border pixels, dominant non-background colour,
and shape from how the object fills the nine cells of its bounding box.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # hack: see sd_lora.demo.pretrain (before torch loads)

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from . import chars, world  # noqa: E402
from .defaults import BASE_MODEL_DIR  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
CHARS_DIR = REPO_ROOT / "datasets" / "chars"
BORDER = 3  # px of the image edge that count as background
MIN_OBJECT_FRACTION = 0.01  # fewer object pixels than this: no object found
CHARACTER_DISTANCE = 60.0  # RGB distance within which a pixel counts as the character's body/head colour
# Of the image's pixels, after erosion. The smallest training image has 2.3% body and 0.4% head; world scenes
# (anti-aliased blue-on-green edges come close to teal) have none after erosion.
MIN_BODY_FRACTION = 0.01
MIN_HEAD_FRACTION = 0.003
# Trigger prompts: the trigger alone, training-like, and on backgrounds the dataset never shows.
FIDELITY_BACKGROUNDS = ("red", "green", "purple", "black")
TRIGGER_PROMPTS = (chars.TRIGGER, f"{chars.TRIGGER}, a large robot character, waving, on a pale yellow background")
DRIFT_PROMPTS = (
    "a large red circle on a blue background",
    "a small yellow square on the left and a white triangle on a black background",
    "a large blue triangle on a green background",
    "a purple cross on a yellow background",
)


def fidelity_prompt(background: str) -> str:
    return f"{chars.TRIGGER}, a robot character, on {world._article(background)} {background} background"


# --- pixel analysis ---------------------------------------------------------------------------------------


def as_array(image) -> np.ndarray:
    """(H, W, 3) float RGB in 0-255 from a PIL image or an array."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32)[..., :3]


def colour_distances(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]] = world.COLOURS) -> np.ndarray:
    """(..., K) Euclidean RGB distance of every pixel to each palette colour (in palette order)."""
    colours = np.asarray(list(palette.values()), dtype=np.float32)
    return np.linalg.norm(pixels[..., None, :] - colours, axis=-1)


def nearest_colour(rgb, palette: dict[str, tuple[int, int, int]] = world.COLOURS) -> str:
    names = list(palette)
    return names[int(np.argmin(colour_distances(np.asarray(rgb, dtype=np.float32), palette)))]


def border_colour(image) -> str:
    """The named colour nearest to the median of the border pixels."""
    pixels = as_array(image)
    ring = np.concatenate([pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
                           pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3)])
    return nearest_colour(np.median(ring, axis=0))


def grid_fill(mask: np.ndarray) -> np.ndarray | None:
    """How much of each of the 3x3 cells of the mask's (robust) bounding box is filled: (9,), or None if empty."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    y0, y1 = np.percentile(ys, [1, 99]).round().astype(int)
    x0, x1 = np.percentile(xs, [1, 99]).round().astype(int)
    box = mask[y0:y1 + 1, x0:x1 + 1].astype(np.float32)
    rows = np.array_split(np.arange(box.shape[0]), 3)
    cols = np.array_split(np.arange(box.shape[1]), 3)
    return np.array([box[np.ix_(r, c)].mean() if len(r) and len(c) else 0.0 for r in rows for c in cols])


@lru_cache(maxsize=1)
def shape_templates() -> dict[str, np.ndarray]:
    """The 3x3 fill of each world shape, drawn large and centred as the world draws it."""
    templates = {}
    for shape in world.SHAPES:
        obj = world.SceneObject(shape, "white", "large", "centre", (0.5, 0.5), 0.5)
        pixels = as_array(world.render(world.Scene("black", (obj,))))
        templates[shape] = grid_fill(pixels.mean(axis=-1) > 128)
    return templates


def classify_shape(mask: np.ndarray) -> str | None:
    """The world shape whose 3x3 fill is nearest to the mask's."""
    fill = grid_fill(mask)
    if fill is None:
        return None
    return min(shape_templates().items(), key=lambda kv: float(np.sum((kv[1] - fill) ** 2)))[0]


@dataclass(frozen=True)
class SceneReading:
    background: str
    colour: str | None  # None: no object found
    shape: str | None


def read_scene(image) -> SceneReading:
    """Background = the border's named colour; object colour = the most common other named colour among the
    pixels; shape = from the pixels of that colour."""
    pixels = as_array(image)
    background = border_colour(pixels)
    names = list(world.COLOURS)
    labels = np.argmin(colour_distances(pixels), axis=-1)  # (H, W) nearest palette index
    counts = np.bincount(labels.ravel(), minlength=len(names))
    counts[names.index(background)] = 0
    best = int(np.argmax(counts))
    if counts[best] < MIN_OBJECT_FRACTION * labels.size:
        return SceneReading(background, None, None)
    return SceneReading(background, names[best], classify_shape(labels == best))


@dataclass(frozen=True)
class CharacterReading:
    body: float  # fraction of pixels near the body's teal
    head: float  # fraction of pixels near the head's orange
    head_above_body: bool

    @property
    def present(self) -> bool:
        return self.body >= MIN_BODY_FRACTION and self.head >= MIN_HEAD_FRACTION and self.head_above_body


def erode(mask: np.ndarray) -> np.ndarray:
    """Keep the pixels whose four neighbours are set too: blobs survive, one-pixel edges and specks do not."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def read_character(image) -> CharacterReading:
    """Is zkchar in the picture: blobs of its teal body and orange head, the head's centre above the body's."""
    pixels = as_array(image)
    body = erode(np.linalg.norm(pixels - np.asarray(chars.PALETTE["body"], np.float32), axis=-1) < CHARACTER_DISTANCE)
    head = erode(np.linalg.norm(pixels - np.asarray(chars.PALETTE["head"], np.float32), axis=-1) < CHARACTER_DISTANCE)
    above = bool(body.any() and head.any() and np.nonzero(head)[0].mean() < np.nonzero(body)[0].mean())
    return CharacterReading(float(body.mean()), float(head.mean()), above)


def concept_score(images) -> float:
    """Fraction of images in which the character is found."""
    images = list(images)
    return sum(read_character(im).present for im in images) / len(images)


def mean_abs_difference(a, b) -> float:
    """Mean absolute pixel difference of two equally sized images, 0-1."""
    return float(np.abs(as_array(a) - as_array(b)).mean() / 255)


def training_images(folder: Path = CHARS_DIR, side: int = world.RESOLUTION) -> list[Image.Image]:
    """The dataset's pictures at about `side`^2 pixels, aspect kept (as training's buckets see them)."""
    images = []
    for path in sorted(Path(folder).rglob("*.png")):
        with Image.open(path) as im:
            scale = side / (im.width * im.height) ** 0.5
            images.append(im.convert("RGB").resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BOX))
    return images


# --- generation -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "ddim"


def load_pipeline(model: str | Path = BASE_MODEL_DIR):
    """(pipeline, BaseModel): the base loaded with `load_base_model`, wrapped for sampling."""
    from ..models.load import load_base_model
    from ..sampling.sampler import build_sampling_pipeline

    base = load_base_model(str(model))
    pipe = build_sampling_pipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                                   scheduler_config=base.scheduler_config, sampler="ddim")
    return pipe, base


def generate(pipe, prompts, settings: GenerationSettings) -> list[list[Image.Image]]:
    """images[prompt][seed] at the model's native size."""
    from ..sampling.prompts import SamplePrompt
    from ..sampling.sampler import SampleSettings, generate_images

    side = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    sample = SampleSettings(width=side, height=side, steps=settings.steps, cfg=settings.cfg, seeds=settings.seeds, sampler=settings.sampler)
    cells, _ = generate_images(pipe, [SamplePrompt(p) for p in prompts], sample)
    return cells


def apply_lora(base, tensors: dict, path: str | Path) -> None:
    """Inject the LoRA `tensors` (kohya keys, as read from the file at `path`) into the base's U-Net (and text
    encoder) and load their weights."""
    from ..errors import UserError
    from ..formats.kohya import from_kohya_state_dict
    from ..lora.inject import inject_lora, load_lora_weights_into
    from ..lora.targets import text_encoder_target_modules, unet_target_modules

    models = {"unet": base.unet, "text_encoder": base.text_encoder}
    paths = {"unet": unet_target_modules(base.unet, "attn-mlp"), "text_encoder": text_encoder_target_modules(base.text_encoder)}
    weights = from_kohya_state_dict(tensors, paths, source=str(path))
    if not any(weights.values()):
        raise UserError(f"{path}: the file has no LoRA modules for this model")
    for component, modules in weights.items():
        if not modules:
            continue
        shapes = {(w.rank, w.alpha) for w in modules.values()}
        if len(shapes) != 1:
            raise UserError(f"{path}: {component} modules have different ranks/alphas {sorted(shapes)}; this evaluator needs one")
        (rank, alpha), = shapes
        inject_lora(models[component], list(modules), rank=rank, alpha=alpha)
        load_lora_weights_into(models[component], modules, source=str(path))


# --- reports ----------------------------------------------------------------------------------------------


@dataclass
class BaseReport:
    background: float  # accuracy on held-out prompts
    colour: float
    shape: float
    all_three: float
    images: int
    chance: dict[str, float] = field(default_factory=dict)


def score_fidelity(readings: list[SceneReading], scenes: list[world.Scene]) -> BaseReport:
    """Accuracy of background, object colour and shape readings against the scenes the prompts describe."""
    bg = [r.background == s.background for r, s in zip(readings, scenes)]
    colour = [r.colour == s.objects[0].colour for r, s in zip(readings, scenes)]
    shape = [r.shape == s.objects[0].shape for r, s in zip(readings, scenes)]
    n = len(readings)
    chance = {"background": 1 / len(world.COLOURS), "colour": 1 / (len(world.COLOURS) - 1), "shape": 1 / len(world.SHAPES)}
    chance["all_three"] = chance["background"] * chance["colour"] * chance["shape"]
    return BaseReport(sum(bg) / n, sum(colour) / n, sum(shape) / n, sum(a and b and c for a, b, c in zip(bg, colour, shape)) / n, n, chance)


def evaluate_base(model: str | Path = BASE_MODEL_DIR, settings: GenerationSettings = GenerationSettings(), backgrounds_per_pair: int = 3) -> BaseReport:
    """Prompt fidelity of the base on held-out (colour, shape) prompts."""
    pipe, _ = load_pipeline(model)
    items = world.held_out_prompts(backgrounds_per_pair)
    cells = generate(pipe, [p for p, _ in items], settings)
    readings, scenes = [], []
    for (_, scene), row in zip(items, cells):
        for image in row:
            readings.append(read_scene(image))
            scenes.append(scene)
    return score_fidelity(readings, scenes)


def format_base_report(r: BaseReport) -> str:
    lines = [f"base prompt fidelity on {r.images} images of held-out colour/shape prompts (accuracy, chance):"]
    for key in ("background", "colour", "shape", "all_three"):
        lines.append(f"  {key.replace('_', ' '):<11} {getattr(r, key):6.1%}   (chance {r.chance[key]:.1%})")
    return "\n".join(lines)


@dataclass
class LoraReport:
    concept_base: float
    concept_lora: float
    concept_training: float
    fidelity_base: float
    fidelity_lora: float
    drift: float
    seed_to_seed: float
    images: dict[str, list[list[Image.Image]]] = field(default_factory=dict, repr=False)
    # Mean fraction of zkchar-teal body pixels in the images of the trigger word alone (the toy world has no
    # teal, so any is learned): the character's first sign, before its head and body are drawn apart.
    teal_base: float = float("nan")
    teal_lora: float = float("nan")
    # The concept score of the trigger word alone (the first trigger prompt), base and LoRA.
    alone_base: float = float("nan")
    alone_lora: float = float("nan")


def evaluate_lora(path: str | Path, model: str | Path = BASE_MODEL_DIR, settings: GenerationSettings = GenerationSettings(),
                  chars_dir: Path = CHARS_DIR) -> LoraReport:
    """Concept score, trigger prompt fidelity and prior drift of the LoRA file against the base, same seeds."""
    from ..formats.kohya import read_lora_file

    tensors, _ = read_lora_file(path)  # a missing or unreadable file is refused before the base model loads
    pipe, base = load_pipeline(model)
    prompts = list(TRIGGER_PROMPTS) + [fidelity_prompt(bg) for bg in FIDELITY_BACKGROUNDS] + list(DRIFT_PROMPTS)
    before = generate(pipe, prompts, settings)
    apply_lora(base, tensors, path)
    after = generate(pipe, prompts, settings)

    n_trigger, n_fidelity = len(TRIGGER_PROMPTS), len(FIDELITY_BACKGROUNDS)
    trigger = slice(0, n_trigger + n_fidelity)
    fidelity = slice(n_trigger, n_trigger + n_fidelity)
    drift = slice(n_trigger + n_fidelity, len(prompts))

    def flat(rows):
        return [im for row in rows for im in row]

    def fidelity_of(rows):
        hits = [border_colour(im) == bg for bg, row in zip(FIDELITY_BACKGROUNDS, rows) for im in row]
        return sum(hits) / len(hits)

    base_drift_rows = before[drift]
    seed_pairs = [(row[i], row[i + 1]) for row in base_drift_rows for i in range(len(row) - 1)]
    return LoraReport(
        concept_base=concept_score(flat(before[trigger])),
        concept_lora=concept_score(flat(after[trigger])),
        concept_training=concept_score(training_images(chars_dir)) if Path(chars_dir).is_dir() else float("nan"),
        fidelity_base=fidelity_of(before[fidelity]),
        fidelity_lora=fidelity_of(after[fidelity]),
        drift=float(np.mean([mean_abs_difference(a, b) for a, b in zip(flat(before[drift]), flat(after[drift]))])),
        seed_to_seed=float(np.mean([mean_abs_difference(a, b) for a, b in seed_pairs])) if seed_pairs else float("nan"),
        images={"prompts": [[p] for p in prompts], "base": before, "lora": after},
        teal_base=float(np.mean([read_character(im).body for im in before[0]])),
        teal_lora=float(np.mean([read_character(im).body for im in after[0]])),
        alone_base=concept_score(before[0]),
        alone_lora=concept_score(after[0]),
    )


def format_lora_report(r: LoraReport, settings: GenerationSettings = GenerationSettings()) -> str:
    seeds = len(settings.seeds)
    scale = (f"between two seeds of the base: {r.seed_to_seed:.3f}" if seeds > 1 else
             "one seed: with --seeds 2 or more, two seeds of the base are compared for scale")
    return "\n".join([
        f"seeds {', '.join(map(str, settings.seeds))}; {settings.steps} {settings.sampler} steps, cfg {settings.cfg:g}",
        f"concept score (zkchar found in trigger-prompt images): base {r.concept_base:.0%}, LoRA {r.concept_lora:.0%} "
        f"(training images: {r.concept_training:.0%})",
        f"  of which {TRIGGER_PROMPTS[0]!r} alone: base {r.alone_base:.0%}, LoRA {r.alone_lora:.0%}",
        f"zkchar teal (a colour the toy world lacks) in images of {TRIGGER_PROMPTS[0]!r} alone: base {r.teal_base:.1%} of pixels, "
        f"LoRA {r.teal_lora:.1%}",
        f"prompt fidelity (named background with the trigger, {len(FIDELITY_BACKGROUNDS) * seeds} images): "
        f"base {r.fidelity_base:.0%}, LoRA {r.fidelity_lora:.0%}",
        f"prior drift (mean |pixel change| on {len(DRIFT_PROMPTS) * seeds} non-trigger images): {r.drift:.3f} "
        f"({scale})",
    ])


def comparison_grid(report: LoraReport) -> Image.Image:
    """Every evaluated prompt (rows), base and LoRA side by side for each seed (columns)."""
    from ..sampling.grid import side_by_side_grid

    prompts = [row[0] for row in report.images["prompts"]]
    seeds = list(range(len(report.images["base"][0])))
    return side_by_side_grid(report.images["base"], report.images["lora"], prompts, seeds, title="same seeds: base | LoRA")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_lora.demo.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("file", nargs="?", type=Path, help="A LoRA .safetensors trained on datasets/chars (omit: evaluate the base only).")
    parser.add_argument("--model", default=str(BASE_MODEL_DIR), help="Base model folder (default: the demo base).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per prompt, 0..N-1 (default: %(default)s).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--grid", type=Path, help="Also save the base-vs-LoRA images as one PNG grid here.")
    args = parser.parse_args(argv)
    from ..errors import ConfigError, run_cli

    def body() -> None:
        problems = [f"--seeds {args.seeds}: evaluate at least one seed (default 3)"] * (args.seeds < 1)
        problems += [f"--steps {args.steps}: sample with at least one step (default 20)"] * (args.steps < 1)
        problems += [f"--cfg {args.cfg}: use a finite guidance scale such as 5"] * (not math.isfinite(args.cfg))
        if args.grid and args.file is None:
            problems.append(f"--grid {args.grid}: the grid shows base and LoRA side by side; give a LoRA FILE too")
        elif args.grid and Image.registered_extensions().get(args.grid.suffix.lower()) not in Image.SAVE:
            problems.append(f"--grid {args.grid}: not an image file name PIL can write; end it in .png")
        if problems:
            raise ConfigError(problems)
        settings = GenerationSettings(seeds=tuple(range(args.seeds)), steps=args.steps, cfg=args.cfg)
        if args.file is None:
            print(format_base_report(evaluate_base(args.model, settings)))
            return
        report = evaluate_lora(args.file, args.model, settings)
        print(format_lora_report(report, settings))
        if args.grid:
            args.grid.parent.mkdir(parents=True, exist_ok=True)  # a missing folder must not lose the evaluation
            comparison_grid(report).save(args.grid)
            print(f"grid: {args.grid}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
