"""`python -m sd_lora.demo.figure RUN_DIR OUT.png`: the README's picture, a run's sample grids side by side.

Takes the step grids a run wrote to `RUN_DIR/samples/` (step 0 = the untouched base, then every
--sample-every steps, then the end), keeps up to `--columns` of them evenly spread, and pastes them left to
right, scaled to `--height` pixels.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from PIL import Image

from ..sampling.grid import BACKGROUND

STEP_GRID = re.compile(r"-step(\d{8})\.png$")


def step_grids(run_dir: Path) -> list[Path]:
    """The run's step grids (not the base-vs-LoRA comparison), in step order."""
    grids = [p for p in (Path(run_dir) / "samples").glob("*.png") if STEP_GRID.search(p.name) and "-compare-" not in p.name]
    return sorted(grids, key=lambda p: int(STEP_GRID.search(p.name).group(1)))


def spread(items: list, count: int) -> list:
    """Up to `count` items, evenly spaced, always including the first and the last."""
    if len(items) <= count:
        return list(items)
    if count == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def progression(grids: list[Image.Image], height: int, gap: int = 8) -> Image.Image:
    """Grids scaled to `height` and pasted left to right with `gap` pixels between them."""
    scaled = [g.resize((max(1, round(g.width * height / g.height)), height), Image.Resampling.LANCZOS) for g in grids]
    out = Image.new("RGB", (sum(g.width for g in scaled) + gap * (len(scaled) - 1), height), BACKGROUND)
    x = 0
    for g in scaled:
        out.paste(g, (x, 0))
        x += g.width + gap
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd_lora.demo.figure", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="A training run's --output-dir (with samples/).")
    parser.add_argument("output", type=Path, help="PNG to write.")
    parser.add_argument("--columns", type=int, default=4, help="Grids to show (default: %(default)s).")
    parser.add_argument("--height", type=int, default=420, help="Height of the picture in pixels (default: %(default)s).")
    args = parser.parse_args(argv)
    for flag, value in (("--columns", args.columns), ("--height", args.height)):
        if value < 1:
            parser.error(f"{flag} {value}: must be 1 or more")
    grids = step_grids(args.run_dir)
    if not grids:
        print(f"sd_lora: error: {args.run_dir / 'samples'}: no step grids (*-stepNNNNNNNN.png); train with --sample-every", file=sys.stderr)
        return 2
    shown = spread(grids, args.columns)
    picture = progression([Image.open(p).convert("RGB") for p in shown], args.height)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.output, optimize=True)
    print(f"{args.output}: {picture.width}x{picture.height}, from {', '.join(p.name for p in shown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
