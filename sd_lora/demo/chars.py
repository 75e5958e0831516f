"""Procedural generator of `datasets/chars`: "zkchar", a small robot character that exists nowhere else.

The character has fixed parts and a fixed palette (teal body, orange head, white eyes, red antenna tip,
dark legs); each picture varies pose (tilt, arm angle), position, scale, background colour and pattern,
image size (128-512 px) and aspect ratio (2:3 to 3:2). Captions start with the trigger word.

    python -m sd_lora.demo.chars datasets/chars [--count 24] [--seed 7]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

TRIGGER = "zkchar"
PALETTE = {"body": (32, 160, 150), "head": (240, 140, 40), "eye": (255, 255, 255), "pupil": (20, 20, 30), "tip": (220, 30, 40), "legs": (50, 50, 60)}
BACKGROUNDS = {
    "light gray": (205, 205, 205),
    "pale yellow": (245, 235, 170),
    "light blue": (170, 205, 240),
    "pink": (240, 180, 200),
    "lavender": (200, 190, 235),
    "beige": (225, 210, 180),
}
PATTERNS = ("plain", "striped", "dotted")
ASPECTS = ((2, 3), (3, 4), (1, 1), (4, 3), (3, 2))


def _rotate(points, centre, angle):
    cx, cy = centre
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def draw_background(draw: ImageDraw.ImageDraw, size: tuple[int, int], colour, pattern: str, rng: random.Random) -> None:
    w, h = size
    draw.rectangle((0, 0, w, h), fill=colour)
    darker = tuple(max(0, c - 30) for c in colour)
    if pattern == "striped":
        gap = rng.randint(12, 28)
        for x in range(-h, w, gap * 2):
            draw.polygon([(x, 0), (x + gap, 0), (x + gap + h, h), (x + h, h)], fill=darker)
    elif pattern == "dotted":
        gap = rng.randint(16, 32)
        for y in range(gap // 2, h, gap):
            for x in range(gap // 2, w, gap):
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=darker)


def draw_character(draw: ImageDraw.ImageDraw, centre: tuple[float, float], scale: float, tilt: float, arm: float) -> None:
    """Draw zkchar centred at `centre`; `scale` is its height in px."""
    cx, cy = centre
    u = scale / 10  # one unit: the character is 10 units tall
    # legs
    for dx in (-1.2, 1.2):
        draw.rectangle((cx + dx * u - 0.5 * u, cy + 2.5 * u, cx + dx * u + 0.5 * u, cy + 5 * u), fill=PALETTE["legs"])
    # body: a tilted rounded box approximated by a polygon
    body = [(cx - 2.5 * u, cy - 1.5 * u), (cx + 2.5 * u, cy - 1.5 * u), (cx + 2.5 * u, cy + 3 * u), (cx - 2.5 * u, cy + 3 * u)]
    draw.polygon(_rotate(body, (cx, cy), tilt), fill=PALETTE["body"])
    # arms
    for side in (-1, 1):
        sx, sy = cx + side * 2.5 * u, cy
        ex, ey = sx + side * 2.2 * u * math.cos(arm), sy - 2.2 * u * math.sin(arm)
        draw.line((sx, sy, ex, ey), fill=PALETTE["body"], width=max(2, int(0.7 * u)))
    # head with antenna
    hx, hy = cx + math.sin(tilt) * 3 * u, cy - 3.5 * u
    draw.line((hx, hy - 2 * u, hx, hy - 3.6 * u), fill=PALETTE["legs"], width=max(1, int(0.3 * u)))
    draw.ellipse((hx - 0.6 * u, hy - 4.2 * u, hx + 0.6 * u, hy - 3.0 * u), fill=PALETTE["tip"])
    draw.ellipse((hx - 2 * u, hy - 2 * u, hx + 2 * u, hy + 2 * u), fill=PALETTE["head"])
    for ex in (-0.8, 0.8):
        draw.ellipse((hx + ex * u - 0.5 * u, hy - 0.7 * u, hx + ex * u + 0.5 * u, hy + 0.3 * u), fill=PALETTE["eye"])
        draw.ellipse((hx + ex * u - 0.2 * u, hy - 0.4 * u, hx + ex * u + 0.2 * u, hy), fill=PALETTE["pupil"])


def make_image(rng: random.Random) -> tuple[Image.Image, str]:
    aw, ah = rng.choice(ASPECTS)
    long_side = rng.randint(128, 512)
    w, h = (long_side, long_side * ah // aw) if aw >= ah else (long_side * aw // ah, long_side)
    bg_name = rng.choice(sorted(BACKGROUNDS))
    pattern = rng.choice(PATTERNS)
    image = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(image)
    draw_background(draw, (w, h), BACKGROUNDS[bg_name], pattern, rng)
    scale = min(w, h) * rng.uniform(0.45, 0.8)
    cx = rng.uniform(0.3, 0.7) * w
    cy = rng.uniform(0.4, 0.6) * h + 0.05 * scale
    tilt = rng.uniform(-0.25, 0.25)
    arm = rng.choice((-0.5, 0.0, 0.6, 1.1))
    draw_character(draw, (cx, cy), scale, tilt, arm)
    pose = {-0.5: "arms down", 0.0: "arms out", 0.6: "arms up", 1.1: "waving"}[arm]
    size = "large" if scale > 0.65 * min(w, h) else "small"
    background = bg_name if pattern == "plain" else f"{pattern} {bg_name}"
    return image, f"{TRIGGER}, a {size} robot character, {pose}, on a {background} background"


POSES = ("arms down", "arms out", "arms up", "waving")


def caption_words() -> list[str]:
    """Every word a caption of this dataset can use (the demo base's tokenizer gives each its own token)."""
    phrases = [TRIGGER, "a small large robot character on background", *POSES, *BACKGROUNDS, *PATTERNS]
    return sorted({w for phrase in phrases for w in phrase.split()})


def generate(out_dir: Path, count: int = 24, seed: int = 7, repeats: int = 5) -> Path:
    folder = Path(out_dir) / f"{repeats}_{TRIGGER}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        image, caption = make_image(rng)
        image.save(folder / f"{TRIGGER}_{i:02d}.png", optimize=True)
        (folder / f"{TRIGGER}_{i:02d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sd_lora.demo.chars", description="Draw the zkchar example dataset.")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    folder = generate(args.output_dir, args.count, args.seed)
    print(f"wrote {args.count} images to {folder}")


if __name__ == "__main__":
    main()
