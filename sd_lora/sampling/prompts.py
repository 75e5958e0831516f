"""Sample prompts: kohya sd-scripts prompt lines, prompt files, and fallback prompts from the captions.

A prompt line is the prompt text followed by per-line options, in any order (kohya's format):

    a photo of zkchar, smiling --n blurry, low quality --w 512 --h 768 --s 28 --l 7.5 --d 42

The text before the first ` --x` is the prompt; each option's value runs to the next ` --x`. Unlike kohya,
an unknown option (kohya silently ignores them), a malformed number, or a --w/--h that is not a multiple of 8
(kohya rounds it down) is an error naming the file and line. `--ss` picks the row's sampler by kohya's names
(`samplers.py`); kohya's options for other models and features (`--g`, `--cn`, ...) are refused with what to do
instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sd_lora.errors import UserError
from sd_lora.sampling.samplers import NAMES as SAMPLER_NAMES


@dataclass(frozen=True)
class SamplePrompt:
    """One row of a sample grid. `None` means "use the sampling settings' value"."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None  # first column's seed; the row's other columns use seed+1, seed+2, ...
    sampler: str | None = None  # `samplers.NAMES`; None: --sample-sampler


MAX_STEPS = 1000
MAX_CFG = 100  # as --sample-cfg: far past any useful guidance, a typo (75 for 7.5) more likely than a wish
MAX_SIDE = 4096  # as --resolution: a 40960 px sample (a typo) would exhaust memory at the first grid, hours in
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes up to 64 bits; keep seed+1, seed+2 in range too

# option letter -> (SamplePrompt field, what the value must be)
OPTIONS: dict[str, tuple[str, str]] = {
    "n": ("negative", "negative prompt text"),
    "w": ("width", f"width in pixels, an integer from 1 to {MAX_SIDE}"),
    "h": ("height", f"height in pixels, an integer from 1 to {MAX_SIDE}"),
    "s": ("steps", f"sampling steps, an integer from 1 to {MAX_STEPS}"),
    "l": ("cfg", f"CFG scale, a number from 0 to {MAX_CFG}"),
    "d": ("seed", "seed, an integer from 0 to 2**63-1"),
    "ss": ("sampler", f"sampler, one of {', '.join(SAMPLER_NAMES)}"),
}
SUPPORTED_OPTIONS_HELP = ", ".join(f"--{k} ({what})" for k, (_, what) in OPTIONS.items())
OPTION_FLAGS = " ".join(f"--{k}" for k in OPTIONS)  # "--n --w --h --s --l --d --ss", for help texts
# kohya sd-scripts' other sample-prompt options (library/train_util.py, line_to_prompt_dict) -> what to do here
KOHYA_ONLY_OPTIONS: dict[str, str] = {
    "g": "kohya's distilled-guidance scale (FLUX-type models); for SD models use --l",
    "cn": "kohya's ControlNet image; sample grids here have no ControlNet",
    "ctr": "kohya's CFG truncation ratio (Lumina); not supported for SD models",
    "rcfg": "kohya's CFG renormalisation (Lumina); not supported for SD models",
    "fs": "kohya's flow shift (flow-matching models); not used by SD models",
}
SIZE_STEP = 8  # the VAE's downscale factor: SD1/SD2/SDXL pipelines refuse other widths and heights

# An option starts with "--" and a letter, at the start of the line or after whitespace. "--" followed by a
# space, or inside a word ("x--y"), is prompt text.
_OPTION_START = re.compile(r"(?:^|\s)--(?=[A-Za-z])")
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def parse_prompt_line(line: str, where: str) -> SamplePrompt:
    """Parse one kohya-style prompt line; `where` (e.g. "prompts.txt:3") prefixes every error message.

    All problems on the line are reported together in one `UserError`. Sizes are only checked to be positive:
    whether they fit the model is `validate_size`'s job.
    """
    text, *option_chunks = _OPTION_START.split(line.strip())
    values: dict[str, object] = {"prompt": text.strip()}
    problems: list[str] = []
    if not values["prompt"]:
        problems.append("the prompt text before the first --option is empty; put the prompt first")

    seen: set[str] = set()
    for chunk in option_chunks:
        name, raw = (re.split(r"\s+", chunk.strip(), maxsplit=1) + [""])[:2]  # a letter follows "--"
        name = name.lower()  # kohya matches options case-insensitively
        if name in KOHYA_ONLY_OPTIONS:
            problems.append(f"--{name} is {KOHYA_ONLY_OPTIONS[name]}: remove it from the line")
            continue
        if name not in OPTIONS:
            option, equals, value = name.partition("=")
            if equals and option in OPTIONS:  # "--w=512", as command-line flags are written
                hint = f" (write --{option} {value or '<value>'}, with a space, not '=')"
            else:
                hint = f" (missing space? write --{name[0]} {name[1:]})" if name[0] in OPTIONS and len(name) > 1 else ""
            problems.append(f"unknown option --{name}{hint}; supported: {SUPPORTED_OPTIONS_HELP}")
            continue
        if name in seen:
            problems.append(f"option --{name} is given twice; keep one")
            continue
        seen.add(name)
        field, expected = OPTIONS[name]
        value = _parse_option_value(name, raw)
        if value is None and not raw:
            problems.append(f"--{name} has no value; expected {expected}")
        elif value is None:
            problems.append(f"--{name} {raw!r} is not valid; expected {expected}")
        else:
            values[field] = value

    if problems:
        raise UserError(_format_problems(where, problems))
    return SamplePrompt(**values)  # type: ignore[arg-type]


def _parse_option_value(name: str, raw: str) -> str | int | float | None:
    """The option's value, or None if `raw` is not acceptable for option `name`."""
    if name == "n":
        return raw
    if name == "ss":
        return raw.lower() if raw.lower() in SAMPLER_NAMES else None
    if name == "l":
        if not _FLOAT.fullmatch(raw):
            return None
        cfg = float(raw)
        return cfg if 0 <= cfg <= MAX_CFG else None  # (also refuses inf and nan)
    if not _INT.fullmatch(raw):  # also refuses "512.0", "1_000" and "" that int() would take or crash on
        return None
    number = int(raw)
    ok = {
        "w": 1 <= number <= MAX_SIDE,
        "h": 1 <= number <= MAX_SIDE,
        "s": 1 <= number <= MAX_STEPS,
        "d": 0 <= number <= MAX_SEED,
    }[name]
    return number if ok else None


def _format_problems(where: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def shown(prompt: str) -> str:
    """A prompt as a grid's row label: the empty prompt (unconditional sampling) is named, not left blank."""
    return prompt or "(empty prompt)"


def validate_size(prompt: SamplePrompt, step: int, where: str) -> None:
    """Raise a `UserError` if the prompt's own --w/--h are not multiples of `step` (the model's size step,
    8 for SD1/SD2). Never rounds: the user should see which size is actually sampled."""
    problems = []
    for option, value in (("w", prompt.width), ("h", prompt.height)):
        if value is not None and value % step:
            lower = max(step, value // step * step)
            problems.append(
                f"--{option} {value} is not a multiple of {step}, which this model needs; use {lower} or {lower + step}"
            )
    if problems:
        raise UserError(_format_problems(where, problems))


def read_prompt_file(path: str | os.PathLike, size_step: int = SIZE_STEP) -> list[SamplePrompt]:
    """Read a UTF-8 prompt file: one prompt line per line; blank lines and lines starting with '#' are skipped.

    Every bad line is reported at once, each as `file:line: problem`, sizes that are not multiples of
    `size_step` (`validate_size`) included.
    """
    path = Path(path)
    if path.suffix.lower() in (".toml", ".json"):
        raise UserError(
            f"{path}: only plain-text prompt files are supported (kohya's .toml/.json prompt files are not). "
            f"Write one prompt per line, with {'/'.join(f'--{k}' for k in OPTIONS)} options, in a .txt file."
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"{path}: prompt file not found. Check the path, or leave the option out to sample with captions "
            "from the dataset."
        ) from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a prompt file. Pass a .txt file with one prompt per line.") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the prompt file ({e.strerror}). Check its permissions.") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows Notepad's "Unicode"
        raise UserError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark). Re-save the file as UTF-8.")
    if b"\x00" in data:  # UTF-16 without a byte-order mark decodes as UTF-8, a NUL in every other byte: garbled prompts
        raise UserError(f"{path}: holds NUL bytes (byte {data.index(0)}): UTF-16 text without a byte-order mark, or not "
                        "text. Re-save the file as UTF-8.")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # Windows editors often write a BOM
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}). Re-save the file as UTF-8."
        ) from None

    prompts: list[SamplePrompt] = []
    problems: list[str] = []
    # Lines as an editor counts them: str.splitlines() would also split at \f, \x1c-\x1e, \x85 and U+2028/U+2029,
    # turning one prompt pasted with such a character into two rows and shifting every later line number.
    for lineno, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        try:
            prompt = parse_prompt_line(stripped, where)
            validate_size(prompt, size_step, where)
            prompts.append(prompt)
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("\n".join(problems))
    if not prompts:
        raise UserError(
            f"{path}: no prompts found (only blank lines and # comments). Add one prompt per line, e.g. "
            "'a photo of zkchar --n blurry --d 42'."
        )
    return prompts


def default_prompts(captions: list[str], n: int = 4) -> list[SamplePrompt]:
    """Up to `n` distinct non-empty captions, evenly spaced through their sorted unique list.

    Deterministic and independent of the captions' order, so grids from different runs on the same dataset
    show the same prompts. Captions are used verbatim: a caption containing " --w" is not parsed as options.
    Without a single non-empty caption (e.g. uncaptioned images in a `5_` folder) the one prompt is the empty
    one: what a LoRA trained on empty captions learned is the model's unconditional image.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unique = sorted({c.strip() for c in captions if c.strip()})
    if not unique and n:
        return [SamplePrompt(prompt="")]
    if len(unique) > n:
        unique = [unique[i * len(unique) // n] for i in range(n)]  # strictly increasing indices: distinct
    return [SamplePrompt(prompt=c) for c in unique]
