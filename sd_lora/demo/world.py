"""The toy world the demo base model is pretrained on: captioned scenes of flat shapes on solid backgrounds.

A scene is one or two objects, small or large, at a named position, on a named background colour. An object
is either a shape in a named colour or a *thing*: a named object made of parts with a fixed palette (a house,
a tree, a character, ...), as a real model knows "a house" without being told its colours. Everything is a
pure function of a seeded `random.Random`: the same seed gives the same scene, caption and pixels. Captions
name every object and sometimes its size and position:

    "a red circle and a small blue square on a yellow background"
    "a large white cross at the top on a purple background"
    "a small character on the left and a red triangle on a green background"

Things are why a LoRA can teach this base a new character at all: from them the base has learned that one word
can stand for several coloured parts in a fixed arrangement (a head above a body), drawn on any background.

Some (colour, shape) pairs never appear in training scenes (`HELD_OUT_PAIRS`); the evaluator asks the base
model for exactly those, so following a prompt means composing words, not recalling a picture.
There is no teal in this world: the zkchar character's teal body is something the base has never drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

RESOLUTION = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 0),
    "orange": (245, 130, 0),
    "purple": (130, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (0.25, 0.32), "large": (0.45, 0.58)}  # object side as a fraction of the image side
# Where an object's centre goes, as fractions of the image side (clamped so the object stays inside).
POSITIONS = {
    "left": ((0.18, 0.30), (0.35, 0.65)),
    "right": ((0.70, 0.82), (0.35, 0.65)),
    "top": ((0.35, 0.65), (0.18, 0.30)),
    "bottom": ((0.35, 0.65), (0.70, 0.82)),
    "centre": ((0.44, 0.56), (0.44, 0.56)),
}
# Things: name -> parts, each (kind, box in the thing's unit square (x0, y0, x1, y1), colour). Drawn in order.
# No thing is teal or has an orange part above another part: zkchar is still nothing the base has drawn.
THINGS: dict[str, tuple[tuple[str, tuple[float, float, float, float], str], ...]] = {
    "house": (("rect", (0.12, 0.45, 0.88, 1.0), "yellow"), ("triangle", (0.0, 0.0, 1.0, 0.47), "red")),
    "tree": (("rect", (0.4, 0.55, 0.6, 1.0), "orange"), ("ellipse", (0.08, 0.0, 0.92, 0.68), "green")),
    "mushroom": (("rect", (0.34, 0.4, 0.66, 1.0), "white"), ("ellipse", (0.0, 0.0, 1.0, 0.55), "red")),
    "lamp": (("rect", (0.45, 0.4, 0.55, 0.92), "black"), ("rect", (0.2, 0.88, 0.8, 1.0), "black"), ("ellipse", (0.22, 0.0, 0.78, 0.5), "yellow")),
    "flag": (("rect", (0.08, 0.0, 0.17, 1.0), "black"), ("rect", (0.17, 0.04, 0.95, 0.52), "blue")),
    "character": (("rect", (0.3, 0.76, 0.44, 1.0), "black"), ("rect", (0.56, 0.76, 0.7, 1.0), "black"),
                  ("rect", (0.22, 0.36, 0.78, 0.78), "purple"), ("ellipse", (0.3, 0.0, 0.7, 0.38), "white")),
}
THING_SHARE = 0.4  # of the objects in training scenes
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "centre": "in the centre"}
# Never drawn in training scenes; `held_out_prompts` asks for them.
HELD_OUT_PAIRS = frozenset({("green", "circle"), ("purple", "square"), ("orange", "triangle"), ("white", "cross"), ("red", "cross")})
VOCABULARY = sorted(
    {"a", "an", "and", "on", "the", "at", "in", "background", *COLOURS, *SHAPES, *SIZES, *THINGS}
    | {w for phrase in POSITION_PHRASES.values() for w in phrase.split()}
)
SUPERSAMPLE = 4  # draw at 4x and downscale: anti-aliased edges, as a real picture would have


@dataclass(frozen=True)
class SceneObject:
    shape: str  # a SHAPES entry, or a THINGS name
    colour: str | None  # None for a thing (its parts have fixed colours)
    size: str  # "small" | "large"
    position: str  # a key of POSITIONS
    centre: tuple[float, float]  # fractions of the image side
    side: float  # fraction of the image side
    say_size: bool = True  # whether the caption names the size
    say_position: bool = False  # whether the caption names the position


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(obj: SceneObject) -> str:
    """"a small red circle on the left", "a house" (size and position only when the object says so)."""
    words = ([obj.size] if obj.say_size else []) + ([obj.colour] if obj.colour else []) + [obj.shape]
    phrase = f"{_article(words[0])} {' '.join(words)}"
    return f"{phrase} {POSITION_PHRASES[obj.position]}" if obj.say_position else phrase


def caption(scene: Scene) -> str:
    return " and ".join(describe(o) for o in scene.objects) + f" on {_article(scene.background)} {scene.background} background"


def _bbox(obj: SceneObject) -> tuple[float, float, float, float]:
    (cx, cy), half = obj.centre, obj.side / 2
    return cx - half, cy - half, cx + half, cy + half


def _overlap(a: SceneObject, b: SceneObject, margin: float = 0.03) -> bool:
    ax0, ay0, ax1, ay1 = _bbox(a)
    bx0, by0, bx1, by1 = _bbox(b)
    return ax0 < bx1 + margin and bx0 < ax1 + margin and ay0 < by1 + margin and by0 < ay1 + margin


def colours_of(obj: SceneObject) -> set[str]:
    """The named colours drawn for `obj`: its colour, or its parts' colours for a thing."""
    return {part[2] for part in THINGS[obj.shape]} if obj.colour is None else {obj.colour}


def place(rng: random.Random, shape: str, colour: str | None, size: str, position: str, *, say_size: bool = True, say_position: bool = False) -> SceneObject:
    """An object with its centre drawn inside `position`'s region, kept fully inside the image."""
    side = rng.uniform(*SIZES[size])
    (x0, x1), (y0, y1) = POSITIONS[position]
    lo, hi = side / 2 + 0.02, 1 - side / 2 - 0.02
    cx = min(max(rng.uniform(x0, x1), lo), hi)
    cy = min(max(rng.uniform(y0, y1), lo), hi)
    return SceneObject(shape, colour, size, position, (cx, cy), side, say_size, say_position)


def _allowed(colour: str, shape: str, split: str) -> bool:
    held = (colour, shape) in HELD_OUT_PAIRS
    return held if split == "held-out" else not held


def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """A random scene. `split="train"` never uses a held-out (colour, shape) pair; `"held-out"` uses only those."""
    if split not in ("train", "held-out"):
        raise ValueError(f"split must be 'train' or 'held-out', got {split!r}")
    count = 1 if split == "held-out" else rng.choice((1, 1, 2))
    objects: list[SceneObject] = []
    tries = 0
    while len(objects) < count:
        tries += 1
        if tries % 20 == 0:  # the first object leaves no room for a second: start the scene again
            objects = []
        if split == "train" and rng.random() < THING_SHARE:
            colour, shape = None, rng.choice(sorted(THINGS))
        else:
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
            if not _allowed(colour, shape, split):
                continue
        if any((o.colour or o.shape) == (colour or shape) for o in objects):  # a colour, or a thing, once per scene
            continue
        size = rng.choice(sorted(SIZES))
        position = "centre" if count == 1 and rng.random() < 0.4 else rng.choice(sorted(POSITIONS))
        obj = place(rng, shape, colour, size, position, say_size=rng.random() < 0.6, say_position=rng.random() < 0.5)
        if any(_overlap(obj, o) or o.position == obj.position for o in objects):
            continue  # resample the second object
        objects.append(obj)
    used = set().union(*(colours_of(o) for o in objects))
    background = rng.choice([c for c in sorted(COLOURS) if c not in used])
    return Scene(background, tuple(objects))


def _polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":  # apex up
        return [(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "cross":  # a plus sign with arms one third of the side wide
        t = half / 3
        return [(cx - t, cy - half), (cx + t, cy - half), (cx + t, cy - t), (cx + half, cy - t), (cx + half, cy + t),
                (cx + t, cy + t), (cx + t, cy + half), (cx - t, cy + half), (cx - t, cy + t), (cx - half, cy + t),
                (cx - half, cy - t), (cx - t, cy - t)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], side: float, fill) -> None:
    """Draw `shape` with its bounding box `side` px wide centred at `centre` (px)."""
    cx, cy = centre
    half = side / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        polygon = _polygon(shape, cx, cy, half)
        if polygon is None:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        draw.polygon(polygon, fill=fill)


def draw_thing(draw: ImageDraw.ImageDraw, name: str, centre: tuple[float, float], side: float) -> None:
    """Draw thing `name` with its bounding box `side` px wide centred at `centre` (px)."""
    left, top = centre[0] - side / 2, centre[1] - side / 2
    for kind, (x0, y0, x1, y1), colour in THINGS[name]:
        box = (left + x0 * side, top + y0 * side, left + x1 * side, top + y1 * side)
        if kind == "rect":
            draw.rectangle(box, fill=COLOURS[colour])
        elif kind == "ellipse":
            draw.ellipse(box, fill=COLOURS[colour])
        else:  # triangle, apex up
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLOURS[colour])


def render(scene: Scene, size: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image `size` px square."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        centre = (obj.centre[0] * big, obj.centre[1] * big)
        if obj.colour is None:
            draw_thing(draw, obj.shape, centre, obj.side * big)
        else:
            draw_shape(draw, obj.shape, centre, obj.side * big, COLOURS[obj.colour])
    return image.resize((size, size), Image.Resampling.BOX)


def sample(seed: int, split: str = "train", size: int = RESOLUTION) -> tuple[Image.Image, str, Scene]:
    """Image, caption and scene for one seed."""
    scene = sample_scene(random.Random(seed), split)
    return render(scene, size), caption(scene), scene


def held_out_prompts(backgrounds_per_pair: int = 3, seed: int = 0) -> list[tuple[str, Scene]]:
    """Evaluation prompts: each held-out (colour, shape) pair, large and centred, on several backgrounds.

    Returns (prompt, the scene the prompt describes) pairs; the scene gives the expected colours and shape.
    """
    return pair_prompts(sorted(HELD_OUT_PAIRS), backgrounds_per_pair, seed)


def seen_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (colour, shape) pairs that training scenes do show, drawn with `seed`."""
    pairs = [(c, s) for c in sorted(COLOURS) for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]
    return sorted(random.Random(seed).sample(pairs, count))


def pair_prompts(pairs, backgrounds_per_pair: int = 3, seed: int = 0) -> list[tuple[str, Scene]]:
    """(prompt, scene) for each (colour, shape) pair, one large centred object, on several backgrounds."""
    rng = random.Random(seed)
    out = []
    for colour, shape in pairs:
        backgrounds = rng.sample([c for c in sorted(COLOURS) if c != colour], backgrounds_per_pair)
        for background in backgrounds:
            obj = SceneObject(shape, colour, "large", "centre", (0.5, 0.5), 0.5, say_size=True, say_position=False)
            scene = Scene(background, (obj,))
            out.append((caption(scene), scene))
    return out


def random_picture(rng: random.Random, size: int = RESOLUTION) -> Image.Image:
    """A picture from outside the captioned world: random colours, stripes or dots, shapes and specks.

    Only the VAE sees these (uncaptioned), so it learns to encode any flat-coloured picture - including the
    colours and small details of a user's LoRA dataset - while the diffusion model still only knows the world.
    """
    big = size * SUPERSAMPLE

    def colour() -> tuple[int, int, int]:
        return tuple(rng.randrange(256) for _ in range(3))

    background = colour()
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    pattern = rng.choice(("plain", "plain", "stripes", "dots"))
    if pattern != "plain":
        shade = tuple(min(255, max(0, c + rng.choice((-40, 40)))) for c in background)
        gap = rng.uniform(0.06, 0.2) * big
        if pattern == "stripes":
            x = -big
            while x < big:
                draw.polygon([(x, 0), (x + gap / 2, 0), (x + gap / 2 + big, big), (x + big, big)], fill=shade)
                x += gap
        else:
            r = gap / 6
            for gy in range(int(big / gap) + 1):
                for gx in range(int(big / gap) + 1):
                    cx, cy = (gx + 0.5) * gap, (gy + 0.5) * gap
                    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=shade)
    for _ in range(rng.randint(1, 6)):
        side = rng.uniform(0.03, 0.6) * big
        centre = (rng.uniform(0, big), rng.uniform(0, big))
        kind = rng.choice(("circle", "square", "triangle", "cross", "ellipse", "line"))
        if kind == "ellipse":
            w, h = side / 2, side * rng.uniform(0.2, 0.5)
            draw.ellipse((centre[0] - w, centre[1] - h, centre[0] + w, centre[1] + h), fill=colour())
        elif kind == "line":
            end = (centre[0] + rng.uniform(-side, side), centre[1] + rng.uniform(-side, side))
            draw.line((*centre, *end), fill=colour(), width=max(1, int(rng.uniform(0.01, 0.05) * big)))
        else:
            draw_shape(draw, kind, centre, side, colour())
    return image.resize((size, size), Image.Resampling.BOX)


REGULARIZATION_SEED = 100_000  # far from the seeds pretraining draws for its first steps


def write_regularization_set(out_dir, count: int = 120, seed: int = REGULARIZATION_SEED) -> list[str]:
    """Write `count` training-split scenes as `world_NNN.png` + `.txt` into `out_dir` (for --reg-data);
    returns the file names written. The default run uses them to keep the base's world while it learns zkchar."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        image, text, _ = sample(seed + i)
        image.save(out / f"world_{i:03d}.png", optimize=True)
        (out / f"world_{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
        names += [f"world_{i:03d}.png", f"world_{i:03d}.txt"]
    return names
