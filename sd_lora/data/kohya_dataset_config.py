"""kohya sd-scripts' dataset config (its `--dataset_config` TOML), read into plain data.

The file has a `[general]` table, `[[datasets]]` and, in each, `[[datasets.subsets]]` (or, in a `.json` file, the
same as JSON objects and lists); every subset is one image folder (`image_dir`). A value missing from a subset falls back to its dataset's, then to `[general]`'s (kohya's
docs/config_README-en.md). sd_lora follows kohya where it can:

  - `image_dir` is read as kohya reads it: only the images directly in it, relative paths from the folder the
    command runs in, and no `N_name` parsing of its own name (`num_repeats` and `class_tokens` say that).
  - `num_repeats`, `class_tokens`, `caption_extension`, `caption_prefix`, `caption_suffix` and `is_reg` apply per
    subset; `is_reg` subsets are regularisation images, as `--reg-data`'s.
  - The dataset and caption options sd_lora applies to the whole run (`RUN_OPTIONS`: resolution, batch size,
    buckets, caption length, caption shuffling and dropout, flips, crops) become the run's options when every dataset and
    subset agrees on them; different values are refused, as are kohya options sd_lora lacks (`UNSUPPORTED`),
    unless set to the value that does nothing.

Nothing here knows about models; `config.py` merges the run options, `scan_subsets` scans the folders.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tomllib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sd_lora.data.images import IMAGE_EXTENSIONS
from sd_lora.data.regularization import regularization_records
from sd_lora.data.scan import MAX_REPEATS, ImageRecord, ScanResult, scan_dataset
from sd_lora.data.ss_metadata import distinct_labels
from sd_lora.errors import ConfigError, UserError

KOHYA_CAPTION_EXTENSION = ".caption"  # kohya's default when neither the file nor --caption_extension sets one

GENERAL, DATASET, SUBSET = "[general]", "[[datasets]]", "[[datasets.subsets]]"


@dataclass(frozen=True)
class RunOption:
    """A kohya key that sd_lora applies to the whole run, as option `field` (a `TrainConfig` field)."""

    field: str
    kind: str  # "bool", "int", "float" or "resolution"
    level: str  # DATASET: set in [general] or [[datasets]]; SUBSET: also in [[datasets.subsets]]
    kohya_default: Any  # what kohya uses where no table sets it (None: no value)


RUN_OPTIONS: dict[str, RunOption] = {
    "resolution": RunOption("resolution", "resolution", DATASET, None),
    "batch_size": RunOption("batch_size", "int", DATASET, 1),
    "enable_bucket": RunOption("buckets", "bool", DATASET, False),
    "min_bucket_reso": RunOption("min_bucket_side", "int", DATASET, 256),
    "max_bucket_reso": RunOption("max_bucket_side", "int", DATASET, 1024),
    "bucket_no_upscale": RunOption("no_upscale", "bool", DATASET, False),
    "max_token_length": RunOption("max_token_length", "int", DATASET, None),
    "keep_tokens": RunOption("keep_tokens", "int", SUBSET, 0),
    "shuffle_caption": RunOption("shuffle_tags", "bool", SUBSET, False),
    "flip_aug": RunOption("flip", "bool", SUBSET, False),
    "random_crop": RunOption("random_crop", "bool", SUBSET, False),
    "caption_dropout_rate": RunOption("caption_dropout", "float", SUBSET, 0.0),
    "caption_tag_dropout_rate": RunOption("tag_dropout", "float", SUBSET, 0.0),
}

# Per-subset keys sd_lora supports: (type, tables it may be written in).
SUBSET_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "image_dir": ("str", (SUBSET,)),
    "is_reg": ("bool", (SUBSET,)),
    "metadata_file": ("str", (SUBSET,)),
    "num_repeats": ("int", (GENERAL, DATASET, SUBSET)),
    "class_tokens": ("str", (GENERAL, DATASET, SUBSET)),
    "caption_extension": ("str", (GENERAL, DATASET, SUBSET)),
    "caption_prefix": ("str", (GENERAL, DATASET, SUBSET)),
    "caption_suffix": ("str", (GENERAL, DATASET, SUBSET)),
}

# kohya keys sd_lora has no equivalent for: accepted only at the value that does nothing (kohya's default),
# else refused with what to do instead.
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "color_aug": ((False,), "sd_lora has no colour augmentation; remove it"),
    "face_crop_aug_range": ((), "sd_lora has no face-crop augmentation; remove it"),
    "token_warmup_min": ((1,), "sd_lora has no token warm-up; remove it"),
    "token_warmup_step": ((0, 0.0), "sd_lora has no token warm-up; remove it"),  # (kohya: steps, or below 1 a share of them)
    "secondary_separator": (("",), "sd_lora splits tags on commas only; replace the separator with commas in the captions"),
    "keep_tokens_separator": (("",), "sd_lora keeps the first keep_tokens tags instead; reorder the captions and use keep_tokens"),
    "caption_separator": ((",",), "sd_lora splits tags on commas only; remove it"),
    "enable_wildcard": ((False,), "sd_lora has no wildcard captions; write one caption per image"),
    "caption_dropout_every_n_epochs": ((0,), "sd_lora drops captions by rate only; use caption_dropout_rate"),
    "cache_info": ((False,), "sd_lora checks every image at the start and keeps no info cache; remove it"),
    "alpha_mask": ((False,), "sd_lora does not weight the loss by alpha masks; remove it"),
    "custom_attributes": ((), "sd_lora has no custom attributes; remove them"),
    "resize_interpolation": ((), "sd_lora resizes with its own filter; remove it"),
    "bucket_reso_steps": ((64,), "sd_lora takes the bucket step from the model (64 px for SD1, SD2 and SDXL); remove it"),
    "network_multiplier": ((1, 1.0), "sd_lora trains at multiplier 1; remove it"),
    "validation_split": ((0, 0.0), "use --validation-split on the command line instead"),
    "validation_seed": ((), "sd_lora chooses held-out images with --seed; remove it"),
    "skip_image_resolution": ((), "sd_lora trains every image of a subset; move small images out of the folder"),
    "conditioning_data_dir": ((), "ControlNet datasets are not supported; sd_lora trains LoRAs from captioned images"),
}

KNOWN_KEYS = sorted({*RUN_OPTIONS, *SUBSET_OPTIONS, *UNSUPPORTED, "subsets"})


@dataclass(frozen=True)
class KohyaSubset:
    """One `[[datasets.subsets]]`, its values after the subset -> dataset -> [general] fallback."""

    place: str
    """Where it is written, e.g. "[[datasets]] #1 [[datasets.subsets]] #2"."""
    dataset: int
    """Its [[datasets]]'s number, from 1: is_reg images balance against their own dataset's training images."""
    image_dir: Path
    """As written in the file; a relative path is read from the folder the command runs in (as kohya does)."""
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str | None = None
    """None: the file does not set it (the run's --caption-extension applies)."""
    caption_prefix: str = ""
    caption_suffix: str = ""


@dataclass(frozen=True)
class KohyaDatasetConfig:
    path: Path
    subsets: list[KohyaSubset]
    run_values: dict[str, list[tuple[str, Any]]]
    """kohya key of `RUN_OPTIONS` -> [(place, value)] for every dataset (dataset-level keys) or subset, its value
    after the fallback, `dataclasses.MISSING` where no table sets it; only keys some table sets."""


def read_dataset_config(path: Path) -> KohyaDatasetConfig:
    """Parse and check a kohya dataset config; raises one `ConfigError` listing every problem."""
    path = Path(path)
    raw = _load(path)
    problems: list[str] = []
    say = lambda place, message: problems.append(f"{path}: {place}: {message}")  # noqa: E731
    for key in raw:
        if key not in ("general", "datasets"):
            say("top level", f"unknown table or key {key!r}{_did_you_mean(key, ['general', 'datasets'])}; a dataset "
                             "config has a [general] table and [[datasets]] tables")
    general = raw.get("general", {})
    datasets = raw.get("datasets", [])
    if not isinstance(general, dict):
        say("top level", "general must be a table: write [general] above its keys")
        general = {}
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        say("top level", "datasets must be tables: write each as [[datasets]]")
        datasets = []
    if not datasets and not problems:
        say("top level", "no [[datasets]]; add one with a [[datasets.subsets]] whose image_dir is your image folder")
    general = _checked(general, GENERAL, GENERAL, say)
    subsets: list[KohyaSubset] = []
    run_values: dict[str, list[tuple[str, Any]]] = {}
    seen_dirs: set[tuple[int, str]] = set()
    for d, dataset in enumerate(datasets, 1):
        dataset_place = f"{DATASET} #{d}"
        tables = dataset.get("subsets", [])
        if not isinstance(tables, list) or not all(isinstance(s, dict) for s in tables) or not tables:
            say(dataset_place, "needs at least one [[datasets.subsets]] table with an image_dir")
            tables = []
        dataset_values = _checked({k: v for k, v in dataset.items() if k != "subsets"}, DATASET, dataset_place, say)
        for key, option in RUN_OPTIONS.items():
            if option.level == DATASET:
                run_values.setdefault(key, []).append((dataset_place, _fallback(key, dataset_values, general)))
        for s, table in enumerate(tables, 1):
            place = f"{dataset_place} {SUBSET} #{s}"
            values = _checked(table, SUBSET, place, say)
            for key, option in RUN_OPTIONS.items():
                if option.level == SUBSET:
                    run_values.setdefault(key, []).append((place, _fallback(key, values, dataset_values, general)))
            subset = _subset(place, d, values, dataset_values, general, say)
            if subset is None:
                continue
            resolved = os.path.realpath(subset.image_dir)
            if (d, resolved) in seen_dirs:  # kohya: the later duplicate in one dataset is ignored
                say(place, f"image_dir {str(subset.image_dir)!r} is already a subset of {dataset_place}; remove one of them")
                continue
            seen_dirs.add((d, resolved))
            subsets.append(subset)
    if subsets and all(subset.is_reg for subset in subsets):
        say("all subsets", "every subset has is_reg = true, so nothing would train; add a subset of your training images")
    if problems:
        raise ConfigError(problems)
    run_values = {k: v for k, v in run_values.items() if any(value is not dataclasses.MISSING for _, value in v)}
    return KohyaDatasetConfig(path, subsets, run_values)


def run_options(config: KohyaDatasetConfig, given: dict[str, tuple[Any, str]]) -> tuple[dict[str, Any], list[str]]:
    """({TrainConfig field: value} the dataset config sets for the whole run, problems).

    `given` holds the run options set elsewhere, {field: (value, where: "command line" or the --config file)}.
    A table that leaves a key out takes the given value, else kohya's default, as kohya would; every dataset or
    subset must then agree, and a given value must match the file's.
    """
    out, problems = {}, []
    for key, places in config.run_values.items():
        option = RUN_OPTIONS[key]
        flag = "--" + option.field.replace("_", "-")
        given_value = given.get(option.field)
        filled = []
        for place, value in places:
            if value is dataclasses.MISSING:
                value, shown = (given_value[0], f"not set, so {flag} {_show(given_value[0])} from the {given_value[1]}") if given_value \
                    else (option.kohya_default, f"not set, so kohya's default {_show(option.kohya_default)}")
            else:
                value, shown = _to_field(option, value), _show(value)
            filled.append((place, value, shown))
        if len({repr(value) for _, value, _ in filled}) > 1:
            listed = "; ".join(f"{place}: {shown}" for place, _, shown in filled)
            problems.append(f"{config.path}: {key} differs between the {_noun(option)}: {listed}. sd_lora applies {key} to the "
                            f"whole run ({flag}) and does not support one value per {_noun(option, 1)}: set it once in [general] "
                            "and remove it from the other tables")
            continue
        value = filled[0][1]
        if key == "resolution" and isinstance(value, tuple):
            problems.append(f"{config.path}: resolution = {list(value)}: sd_lora trains square-area buckets of one resolution; "
                            f"write resolution = N (e.g. {max(value)})")
            continue
        if (key == "bucket_no_upscale" and given_value is not None and not given_value[0]
                and not out.get("buckets", given.get("buckets", (True,))[0])):  # (enable_bucket comes first)
            continue  # no contradiction: it does nothing without buckets in kohya, and config.toml records it off
        if given_value is not None and given_value[0] != value:
            set_in = ", ".join(place for place, v in places if v is not dataclasses.MISSING)
            problems.append(f"{flag} {_show(given_value[0])} ({given_value[1]}) contradicts {key} = {_show(value)} in "
                            f"{config.path} ({set_in}); drop {flag} or change the dataset config")
            continue
        out[option.field] = value
    return out, problems


def scan_subsets(config: KohyaDatasetConfig, *, prior: bool, caption_extension: str,
                 skip_bad_images: bool = False) -> ScanResult:
    """Scan the training subsets (`prior=False`) or the `is_reg` ones into one ScanResult: each image_dir on its
    own, repeated `num_repeats` times, captioned by its caption files, else its class tokens, with
    `caption_prefix` and `caption_suffix` joined by a space as kohya joins them (`caption_as_read`: without them). Records are
    labelled by image_dir's name, as kohya keys `ss_dataset_dirs` and `ss_tag_frequency` (`_labels`: with parent
    folders where two image_dirs share a name, `name (2)` for an image_dir in a second dataset). `caption_extension`
    applies where the file sets none. Prior records are not marked here: `balance_regularization` balances and marks them."""
    records: list[ImageRecord] = []
    result = ScanResult(records)
    labels = _labels([subset.image_dir for subset in config.subsets])
    for subset, label in zip(config.subsets, labels):
        if subset.is_reg != prior:
            continue
        where = f"{config.path}: {subset.place} (image_dir {str(subset.image_dir)!r})"
        try:
            scan = scan_dataset(subset.image_dir, caption_extension=subset.caption_extension or caption_extension,
                                skip_bad_images=skip_bad_images, recursive=False, default_caption=subset.class_tokens or "")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        for record in scan.records:
            caption = " ".join(part for part in (subset.caption_prefix, record.caption, subset.caption_suffix) if part)
            records.append(dataclasses.replace(record, caption=caption, caption_as_read=record.caption, repeats=subset.num_repeats,
                                               folder=label))
        result.skipped += scan.skipped
        result.warnings += [f"{where}: {w}" for w in scan.warnings]
        if prior and subset.num_repeats != 1:
            result.warnings.append(f"{where}: num_repeats = {subset.num_repeats} is not used for is_reg images: each epoch "
                                   "sees as many regularisation samples as training samples (as with --reg-data)")
    return result


def balance_regularization(config: KohyaDatasetConfig, train_records: list[ImageRecord],
                           prior_records: list[ImageRecord]) -> tuple[list[ImageRecord], list[str]]:
    """(`scan_subsets(prior=True)`'s records balanced as kohya balances them, warnings): each [[datasets]]'s is_reg
    images against the training images of the same dataset only (repeats counted), not of the whole run; a
    dataset without training images leaves its is_reg images unused, as in kohya."""
    dataset_of = dict(zip(_labels([subset.image_dir for subset in config.subsets]), (s.dataset for s in config.subsets)))
    samples_of, priors_of = Counter(), defaultdict(list)  # per dataset: training samples, is_reg records in order
    for record in train_records:
        if record.folder in dataset_of:
            samples_of[dataset_of[record.folder]] += record.repeats
    for record in prior_records:
        priors_of[dataset_of[record.folder]].append(record)
    out, warnings = [], []
    for number in sorted(priors_of):
        if not samples_of[number]:
            warnings.append(f"{config.path}: {DATASET} #{number}: its is_reg images are not used: the dataset has no training "
                            "images to balance them against (as in kohya); move them to the dataset of the images they regularise")
        out += regularization_records(priors_of[number], samples_of[number])
    return out, warnings


def _labels(image_dirs: list[Path]) -> list[str]:
    """Each image_dir's label in the metadata: its name, as kohya's, with as many parent folders as tell it apart from
    the others' (`distinct_labels`: `char_a/images`, `char_b/images`), so their entries (each with its own num_repeats)
    are not merged into one. A folder that is a subset of several datasets is `name (2)`, `name (3)` after the
    first, as in kohya's `ss_dataset_dirs`."""
    parts = [Path(os.path.abspath(d)).parts[1:] for d in image_dirs]
    seen = Counter()
    labels = []
    for own, label in zip(parts, distinct_labels(parts)):
        seen[own] += 1
        labels.append(label + (f" ({seen[own]})" if seen[own] > 1 else ""))
    return labels


# --- reading and checking ------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8-sig")  # (Windows editors often write a BOM)
    except FileNotFoundError:
        raise UserError(f"--dataset-config {path}: file not found ({Path(os.path.abspath(path))}); check the path") from None
    except IsADirectoryError:
        raise UserError(f"--dataset-config {path}: is a folder; pass kohya's dataset config TOML file (or --data for a folder)") from None
    except OSError as e:
        raise UserError(f"--dataset-config {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise UserError(f"--dataset-config {path}: not a UTF-8 text file; a dataset config is TOML text") from None
    if path.suffix.lower() == ".json":  # kohya reads its dataset configs as JSON too, by this suffix
        try:
            table = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--dataset-config {path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        if not isinstance(table, dict):
            raise UserError(f"--dataset-config {path}: a JSON dataset config is one object "
                            '({"general": {...}, "datasets": [{..., "subsets": [{"image_dir": ...}]}]}), not a '
                            f"{type(table).__name__}")
        return table
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--dataset-config {path}: invalid TOML ({e}); see configs/datasets/zkchar.toml for an example") from None


def _checked(table: dict, level: str, place: str, say) -> dict:
    """The keys of one table whose names, tables and types are right (the others reported through `say`)."""
    out = {}
    for key, value in table.items():
        if key in UNSUPPORTED:
            noop, fix = UNSUPPORTED[key]
            if not any(value == v and type(value) is type(v) for v in noop):
                say(place, f"{key} = {_show(value)} is a kohya option sd_lora does not support; {fix}")
            continue
        if key in RUN_OPTIONS:
            option = RUN_OPTIONS[key]
            tables = (GENERAL, DATASET, SUBSET) if option.level == SUBSET else (GENERAL, DATASET)
            kind = option.kind
        elif key in SUBSET_OPTIONS:
            kind, tables = SUBSET_OPTIONS[key]
        elif key in ("subsets", "datasets"):  # a table in the wrong place, not a misspelt key
            say(place, f"{key} cannot be set in a {level} table: subsets are [[datasets.subsets]] tables after their "
                       "[[datasets]] table (see configs/datasets/zkchar.toml)")
            continue
        else:
            hint = _did_you_mean(key, KNOWN_KEYS)
            say(place, f"unknown key {key!r}{hint}; see kohya's docs/config_README-en.md for the keys")
            continue
        if level not in tables:
            where = " or ".join(tables)
            say(place, f"{key} cannot be set in a {level} table; move it to {where}")
            continue
        problem = _type_problem(kind, value)
        if problem:
            say(place, f"{key} = {_show(value)} must be {problem}")
            continue
        out[key] = value
    if "num_repeats" in out and out["num_repeats"] < 1:  # (in [general] or [[datasets]] too: its subsets inherit it)
        fix = "to leave the folder out, remove its subset" if level == SUBSET else "set it in each subset that should train"
        say(place, f"num_repeats = {out['num_repeats']} must be at least 1; {fix}")
        out.pop("num_repeats")
    elif "num_repeats" in out and out["num_repeats"] > MAX_REPEATS:  # an epoch would never end
        say(place, f"num_repeats = {out['num_repeats']} is more than {MAX_REPEATS:,} repeats per epoch; use a smaller "
                   "count (to train longer, raise --epochs or --max-steps)")
        out.pop("num_repeats")
    return out


def _subset(place: str, number: int, values: dict, dataset: dict, general: dict, say) -> KohyaSubset | None:
    if "metadata_file" in values:
        say(place, "metadata_file (kohya's fine-tuning JSON) is not supported; put each caption in a .txt file beside its "
                   "image (or in a metadata.jsonl) and use image_dir")
        return None
    if "image_dir" not in values:
        say(place, "image_dir is missing; set it to the folder that holds this subset's images")
        return None
    image_dir = Path(values["image_dir"]).expanduser()
    if not image_dir.is_dir():
        relative = "" if image_dir.is_absolute() else f", read from the folder you run in, {Path.cwd()}, as kohya does"
        state = "is a file, not a folder" if image_dir.exists() else "folder not found"
        say(place, f"image_dir {values['image_dir']!r}: {state} ({Path(os.path.abspath(image_dir))}{relative}); fix the path")
        return None
    get = lambda key, default: _fallback(key, values, dataset, general, default=default)  # noqa: E731
    extension = get("caption_extension", None)
    if extension is not None and (not extension.startswith(".") or len(extension) < 2 or extension.lower() in IMAGE_EXTENSIONS):
        say(place, f"caption_extension = {extension!r} must start with a dot and not be an image extension, e.g. '.txt' or '.caption'")
        return None
    return KohyaSubset(
        place=place, dataset=number, image_dir=image_dir, num_repeats=get("num_repeats", 1), is_reg=values.get("is_reg", False),
        class_tokens=get("class_tokens", None), caption_extension=extension,
        caption_prefix=get("caption_prefix", ""), caption_suffix=get("caption_suffix", ""),
    )


def _fallback(key: str, *tables: dict, default: Any = dataclasses.MISSING) -> Any:
    """The first table's value for `key` (subset, then dataset, then [general]), else `default`."""
    for table in tables:
        if key in table:
            return table[key]
    return default


def _type_problem(kind: str, value: Any) -> str | None:
    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    if kind == "int":
        return None if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else "a whole number >= 0"
    if kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
        return None if ok else "a number from 0 to 1"
    if kind == "resolution":
        pair = isinstance(value, list) and len(value) == 2 and all(_type_problem("int", v) is None for v in value)
        return None if pair or (_type_problem("int", value) is None and value > 0) else "a whole number or [width, height]"
    return None if isinstance(value, str) else "a string"


def _to_field(option: RunOption, value: Any) -> Any:
    if option.kind == "resolution" and isinstance(value, list):
        return value[0] if value[0] == value[1] else tuple(value)
    return float(value) if option.kind == "float" else value


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _noun(option: RunOption, one: int = 0) -> str:
    word = "dataset" if option.level == DATASET else "subset"
    return word if one else word + "s"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)
