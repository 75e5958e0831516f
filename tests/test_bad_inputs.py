"""The bad-input corpus: every kind of broken file, folder, model, option and config a user has sent us.

Each case goes through the real entry point, `sd_lora.train.main([...])`, in-process, and must be refused
with exit status 2 and one `sd_lora: error: ...` message that names the offending file, line or value and
says what to do; never a traceback, and nothing lost: the files under the test's folder (data, an existing
LoRA in the output folder, configs) are exactly as they were, and no half-written output appears.
Harmless inputs are accepted, with a counted warning where the user should know.

A case is a function that breaks a fresh copy of the tiny dataset (or writes a bad model, config or prompt
file) and returns the command line; `@bad(...)` registers it with the substrings its message must contain.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from sd_lora import train
from sd_lora.data import scan_dataset

MINIMAL = ["--max-steps", "1", "--sample-every", "0", "--resolution", "32", "--rank", "2"]
PREVIOUS_LORA = b"a LoRA from an earlier run; a refused run must not touch it"


@dataclass
class Env:
    tmp: Path
    data: Path  # the tiny dataset: data/2_zkchar/img{0..5}.png with .txt captions
    model: Path  # the session's tiny SD1 model (outside `tmp`)
    out: Path  # holds zk.safetensors from an "earlier run"
    monkeypatch: pytest.MonkeyPatch

    @property
    def img(self) -> Path:
        return self.data / "2_zkchar"

    def argv(self, *extra: str, data: Path | None = None, model: Path | str | None = None) -> list[str]:
        return ["--data", str(data or self.data), "--model", str(model or self.model), "--output-dir", str(self.out),
                "--output-name", "zk", *MINIMAL, *extra]

    def write(self, relative: str, content: str | bytes) -> Path:
        path = self.tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path


@pytest.fixture
def env(tmp_path, tiny_dataset, tiny_model_dir, monkeypatch) -> Env:
    out = tmp_path / "out"
    out.mkdir()
    (out / "zk.safetensors").write_bytes(PREVIOUS_LORA)
    return Env(tmp_path, tiny_dataset, tiny_model_dir, out, monkeypatch)


# --- helpers that make bad files -----------------------------------------------------------------------


def image_bytes(fmt: str, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buf, fmt)  # noise: the data is long enough to cut
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring `width` x `height`, and no real pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def metadata_lines(env: Env, *lines: str) -> None:
    """metadata.jsonl at the data root: a good first line, then `lines` (so problems are on line 2+)."""
    good = json.dumps({"file_name": "2_zkchar/img0.png", "text": "zkchar from metadata"})
    env.write("data/metadata.jsonl", "\n".join([good, *lines]) + "\n")


def fake_model(env: Env, name: str = "fake-model", index: str = "{}") -> Path:
    folder = env.tmp / name
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / component).mkdir(parents=True)
    (folder / "model_index.json").write_text(index)
    return folder


# --- the corpus ----------------------------------------------------------------------------------------

BAD: dict[str, tuple] = {}


def bad(*expected: str, before_model: bool = False):
    """Register a case. `expected`: substrings of the error message, formatted with {data} {img} {tmp}
    {out}. `before_model`: an option problem, refused before the (slow, for real models) model load."""
    def register(make):
        BAD[make.__name__] = (make, expected, before_model)
        return make
    return register


# Images ---------------------------------------------------------------------------------------------


@bad("{img}/img0.png: image is empty (0 bytes)", "Fix or remove these files, or pass --skip-bad-images")
def empty_image(env):
    (env.img / "img0.png").write_bytes(b"")
    return env.argv()


@bad("{img}/img0.png: cannot decode image (truncated file)", "Fix or remove these files")
def truncated_png(env):
    data = image_bytes("PNG")
    (env.img / "img0.png").write_bytes(data[: len(data) * 6 // 10])
    return env.argv()


@bad("{img}/photo.jpg: cannot decode image (truncated file)", "Fix or remove these files")
def truncated_jpeg(env):
    data = image_bytes("JPEG")
    (env.img / "photo.jpg").write_bytes(data[: len(data) // 2])
    return env.argv()


@bad("{img}/notes.png: not an image file (Pillow cannot identify it)", "Fix or remove these files")
def text_file_named_png(env):
    (env.img / "notes.png").write_text("these are not pixels\n")
    return env.argv()


@bad("{img}/img0.png: decompression bomb: 10000 pixels exceeds the limit of 5000", "downscale the image",
     "Fix or remove these files")
def decompression_bomb_over_the_limit(env):
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; the scan must refuse it anyway.
    env.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    Image.new("RGB", (100, 100), "red").save(env.img / "img0.png")
    return env.argv()


@bad("{img}/huge.png: decompression bomb: 10000000000 pixels exceeds the limit of", "downscale the image")
def decompression_bomb_header(env):
    (env.img / "huge.png").write_bytes(png_header_only(100_000, 100_000))
    return env.argv()


@bad("{img}/img0.png: cannot read file (Permission denied)", "Fix or remove these files")
def unreadable_image(env):
    target = env.img / "img0.png"
    target.chmod(0)
    if os.geteuid() == 0:  # root reads through chmod 000: fail its open the way a user's would fail
        real_open, blocked = builtins.open, os.path.realpath(target)

        def open_(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == blocked:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)

        env.monkeypatch.setattr(builtins, "open", open_)
    return env.argv()


@bad("{img}/gone.png: broken symlink (missing.png); point it at an existing image or remove it")
def dangling_symlink(env):
    os.symlink("missing.png", env.img / "gone.png")
    return env.argv()


@bad("{img}/self.png: symlink loop (self.png leads back to itself)")
def symlink_to_itself(env):
    os.symlink("self.png", env.img / "self.png")
    return env.argv()


@bad("{img}/pipe.png: not a regular file (a pipe, socket or device)")
def fifo_named_png(env):  # opening it would block the scan forever
    os.mkfifo(env.img / "pipe.png")
    return env.argv()


@bad("{img}/tiny.png: image too small: 8x8 px (the minimum is 16 px per side)", "Fix or remove these files")
def image_too_small(env):
    Image.new("RGB", (8, 8), "red").save(env.img / "tiny.png")
    return env.argv()


@bad("{img}/img0.png: caption file img0.txt is not valid UTF-8", "re-save it as UTF-8")
def caption_not_utf8(env):
    (env.img / "img0.txt").write_bytes("zkchar, café".encode("latin-1"))
    return env.argv()


# metadata.jsonl ---------------------------------------------------------------------------------------

METADATA_FIX = "Fix the metadata.jsonl/metadata.csv lines and folder names above (--skip-bad-images does not skip them)"


@bad("{data}/metadata.jsonl:2: invalid JSON", "each line must be one JSON object", METADATA_FIX)
def metadata_bad_json(env):
    metadata_lines(env, '{"file_name": "2_zkchar/img1.png", "text": "unclosed"')
    return env.argv()


@bad("{data}/metadata.jsonl:3: missing key 'file_name'", "each line needs \"file_name\" and \"text\"", METADATA_FIX)
def metadata_missing_file_name(env):
    metadata_lines(env, "", json.dumps({"text": "no file"}))  # a blank line 2 still counts
    return env.argv()


@bad("{data}/metadata.jsonl:2: 'text' must be a string, got [\"a\", \"b\"]", METADATA_FIX)
def metadata_text_not_a_string(env):
    metadata_lines(env, json.dumps({"file_name": "2_zkchar/img1.png", "text": ["a", "b"]}))
    return env.argv()


@bad("{data}/metadata.jsonl:2: file_name '../outside.png' points outside the data folder", METADATA_FIX)
def metadata_path_escapes_data(env):
    Image.new("RGB", (32, 32)).save(env.tmp / "outside.png")
    metadata_lines(env, json.dumps({"file_name": "../outside.png", "text": "escape"}))
    return env.argv()


@bad("{data}/metadata.jsonl:2: file_name '{img}/img1.png' is absolute",
     "write it relative to the folder of this metadata.jsonl")
def metadata_absolute_path(env):
    metadata_lines(env, json.dumps({"file_name": str(env.img / "img1.png"), "text": "absolute"}))
    return env.argv()


@bad("{data}/metadata.jsonl:2: file_name '2_zkchar/nope.png' does not exist", METADATA_FIX)
def metadata_names_missing_image(env):
    metadata_lines(env, json.dumps({"file_name": "2_zkchar/nope.png", "text": "ghost"}))
    return env.argv()


@bad("{data}/metadata.jsonl: not valid UTF-8", "re-save it as UTF-8")
def metadata_not_utf8(env):
    env.write("data/metadata.jsonl", '{"file_name": "2_zkchar/img0.png", "text": "caf\xe9"}\n'.encode("latin-1"))
    return env.argv()


# The data folder ------------------------------------------------------------------------------------


@bad("{tmp}/empty: no images found", "Put your images in this folder")
def empty_data_folder(env):
    (env.tmp / "empty" / "sub").mkdir(parents=True)
    return env.argv(data=env.tmp / "empty")


@bad("--data {tmp}/nowhere: folder not found", before_model=True)
def missing_data_folder(env):
    return env.argv(data=env.tmp / "nowhere")


@bad("--data {data}/2_zkchar/img0.png: is a file, not a folder of images", before_model=True)
def data_is_a_file(env):
    return env.argv(data=env.img / "img0.png")


@bad("{data}/0_zkchar: folder gives 0 repeats", "rename it", METADATA_FIX)
def zero_repeat_folder(env):
    env.img.rename(env.data / "0_zkchar")
    return env.argv()


@bad("{tmp}/allbad: no usable images (2 bad files, e.g. {tmp}/allbad/a.png: image is empty (0 bytes))",
     "fix them and run again")
def skip_bad_images_but_all_are_bad(env):
    env.write("allbad/a.png", b"")
    env.write("allbad/b.png", "not an image")
    return env.argv("--skip-bad-images", data=env.tmp / "allbad")


@bad("caption extension '.png' is an image extension; use e.g. '.txt'")
def caption_extension_is_image_extension(env):
    return env.argv("--caption-extension", ".png")


# --model --------------------------------------------------------------------------------------------


@bad("--model {tmp}/not-a-model: not a diffusers model folder (no model_index.json)",
     "Pass the folder that holds model_index.json")
def model_is_a_plain_folder(env):
    env.write("not-a-model/readme.md", "hello")
    return env.argv(model=env.tmp / "not-a-model")


@bad("--model {tmp}/notes.txt: is a file, not a model; pass a single-file checkpoint", "a diffusers folder")
def model_is_a_random_file(env):
    return env.argv(model=env.write("notes.txt", "hello"))


@bad("{tmp}/sd15.safetensors: not a valid .safetensors file", "the download may be incomplete")
def model_is_a_damaged_single_file_checkpoint(env):
    return env.argv(model=env.write("sd15.safetensors", b"\0" * 64))


@bad("--model {tmp}/fake-model: model_index.json is not valid JSON", "fetch the model again")
def model_index_not_json(env):
    return env.argv(model=fake_model(env, index='{"_class_name": "StableDiffusionPipeline",'))


@bad("--model {tmp}/half-model: the diffusers folder lacks unet/, vae/", "incomplete or not a Stable Diffusion model")
def model_folder_incomplete(env):
    env.write("half-model/model_index.json", "{}")
    (env.tmp / "half-model" / "text_encoder").mkdir()
    return env.argv(model=env.tmp / "half-model")


@bad("--model {tmp}/damaged: cannot load unet/", "download the model again")
def model_weights_damaged(env):
    damaged = shutil.copytree(env.model, env.tmp / "damaged")
    for weights in (damaged / "unet").glob("*.safetensors"):
        weights.write_bytes(b"half a download")
    return env.argv(model=damaged)


@bad("--model nosuch-org/no-such-model: cannot load unet/", "check the id")
def model_hub_id_unavailable(env):  # HF_HUB_OFFLINE=1 (conftest): the same answer a typo'd id gets online
    return env.argv(model="nosuch-org/no-such-model")


# Options --------------------------------------------------------------------------------------------


@bad("--rank 0 is out of range: it must be >= 1", before_model=True)
def rank_zero(env):
    return env.argv("--rank", "0")


@bad("--learning-rate -1.0 is out of range: it must be > 0", before_model=True)
def negative_learning_rate(env):
    return env.argv("--learning-rate", "-1")


@bad("--caption-dropout 2.0 is out of range: it must be <= 1", before_model=True)
def caption_dropout_above_one(env):
    return env.argv("--caption-dropout", "2")


@bad("rank = 'sixteen' must be a whole number", before_model=True)
def rank_not_a_number(env):
    return env.argv("--rank", "sixteen")


@bad("--lr-scheduler 'cosin' is not supported (did you mean 'cosine'?)", "choose one of: constant", before_model=True)
def unknown_choice(env):
    return env.argv("--lr-scheduler", "cosin")


@bad("--rnak", "did you mean --rank?", before_model=True)
def unknown_flag(env):
    return env.argv("--rnak", "4")


@bad("--sample-every", "expected one argument", before_model=True)
def flag_without_value(env):
    return [*env.argv(), "--sample-every"]


@bad("--resolution 30 must be a multiple of 4 px for this model (e.g. 32)")
def resolution_not_multiple_of_model_step(env):
    return env.argv("--resolution", "30")


@bad("--clip-skip 7: this model's text encoder has 3 usable layers for it; use 1 to 3")
def clip_skip_beyond_the_text_encoder(env):  # was an IndexError, and one less conditioned on the token embeddings
    return env.argv("--clip-skip", "7")


@bad("--output-dir {tmp}/taken: cannot write there", "choose a writable folder")
def output_dir_is_a_file(env):
    env.write("taken", "a file where the output folder should go")
    return [*env.argv()[:4], "--output-dir", str(env.tmp / "taken"), *env.argv()[6:]]


# TOML configs (--config) ----------------------------------------------------------------------------


@bad("{tmp}/run.toml: unknown key 'rnak' (did you mean 'rank'?)", before_model=True)
def toml_unknown_key(env):
    return env.argv("--config", str(env.write("run.toml", "learning-rate = 1e-4\nrnak = 4\n")))


@bad("{tmp}/run.toml: invalid TOML (", "line 2", "see configs/ for examples", before_model=True)
def toml_invalid(env):
    return env.argv("--config", str(env.write("run.toml", "rank = 4\nlearning-rate = \n")))


@bad("{tmp}/run.toml: rank = 'sixteen' must be a whole number", before_model=True)
def toml_wrong_type(env):
    return env.argv("--config", str(env.write("run.toml", 'rank = "sixteen"\n')))


@bad("{tmp}/run.toml: flip = 'yes' must be true or false", before_model=True)
def toml_bool_as_string(env):
    return env.argv("--config", str(env.write("run.toml", 'flip = "yes"\n')))


@bad("{tmp}/run.toml: [model_arguments] tables are not used", "(rank)", "at the top level", before_model=True)
def toml_section(env):  # kohya_ss GUI configs group their keys in sections
    return env.argv("--config", str(env.write("run.toml", "[model_arguments]\nrank = 4\n")))


@bad("{tmp}/missing.toml: config file not found", before_model=True)
def toml_missing(env):
    return env.argv("--config", str(env.tmp / "missing.toml"))


# Sample prompt files (--sample-prompts) -------------------------------------------------------------
# Sampling is on (--sample-every 1) so the prompts would really be used.


@bad("{tmp}/prompts.txt:3: unknown option --q; supported: --n (negative prompt text)", before_model=True)
def prompt_unknown_option(env):
    prompts = env.write("prompts.txt", "zkchar, a robot\n# a comment\nzkchar on a beach --q 5\n")
    return env.argv("--sample-prompts", str(prompts), "--sample-every", "1")


@bad("{tmp}/prompts.txt:1: --w 'wide' is not valid; expected width in pixels, an integer from 1 to 4096", before_model=True)
def prompt_bad_number(env):
    prompts = env.write("prompts.txt", "zkchar --w wide --h 32\n")
    return env.argv("--sample-prompts", str(prompts), "--sample-every", "1")


@bad("{tmp}/prompts.txt:1: --w 36 is not a multiple of 8", "use 32 or 40", before_model=True)
def prompt_size_not_multiple_of_8(env):
    prompts = env.write("prompts.txt", "zkchar --w 36\n")
    return env.argv("--sample-prompts", str(prompts), "--sample-every", "1")


@bad("--sample-prompts {tmp}/nope.txt: file not found", before_model=True)
def prompt_file_missing(env):
    return env.argv("--sample-prompts", str(env.tmp / "nope.txt"), "--sample-every", "1")


# --- running the corpus ---------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: type, a file's size and mtime, a link's target. Opens nothing (FIFOs, chmod 000)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            regular = stat.S_ISREG(st.st_mode)  # a folder's mtime moves with the write probe: not compared
            content = (st.st_size, st.st_mtime_ns) if regular else None
            entries[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), content, link)
    return entries


def call_main(argv: list[str]) -> int:
    try:
        return train.main(argv)
    except SystemExit as e:  # argparse prints its whole usage and exits; main() should return 2 instead
        pytest.fail(f"main() raised SystemExit({e.code}) instead of returning 2 with an `sd_lora: error:` line")


def record_model_loads(monkeypatch) -> list:
    """Calls that load the U-Net, however the trainer reaches diffusers."""
    from diffusers import UNet2DConditionModel

    loads, load = [], UNet2DConditionModel.from_pretrained
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or load(*a, **k)))
    return loads


def test_corpus_is_large_and_distinct():
    assert len(BAD) >= 25
    assert len({expected for _, expected, _ in BAD.values()}) == len(BAD)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_clearly(case, env, capsys):
    make, expected, before_model = BAD[case]
    argv = make(env)
    loads = record_model_loads(env.monkeypatch)
    capsys.readouterr()
    before = snapshot(env.tmp)

    code = call_main(argv)

    out, err = capsys.readouterr()
    assert code == 2, f"exit status {code}\n{err[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in out
    assert "sd_lora: error: " in err, err[-2000:]
    message = err[err.index("sd_lora: error: "):]
    fields = dict(data=env.data, img=env.img, tmp=env.tmp, out=env.out)
    for text in expected:
        assert text.format(**fields) in message, f"missing {text.format(**fields)!r} in:\n{message}"
    # Nothing lost: the earlier LoRA is untouched and nothing was written, removed or half-written.
    assert (env.out / "zk.safetensors").read_bytes() == PREVIOUS_LORA
    assert snapshot(env.tmp) == before
    assert "done:" not in out
    if before_model:
        assert not loads, "an option problem must be refused before the model loads"


# --- harmless inputs: accepted, with a counted warning where the user should know ------------------------


def test_png_named_jpg_is_fine(env):
    (env.img / "img0.png").rename(env.img / "img0.jpg")  # Pillow opens by content, not by name
    result = scan_dataset(env.data)
    assert [r.path.name for r in result.records][0] == "img0.jpg"
    assert len(result.records) == 6 and result.warnings == [] and result.skipped == []


def test_folder_named_like_an_image_is_just_a_folder(env):
    (env.img / "extra.png").mkdir()
    Image.new("RGB", (32, 32)).save(env.img / "extra.png" / "inner.png")
    (env.img / "extra.png" / "inner.txt").write_text("zkchar, inner")
    result = scan_dataset(env.data)
    assert len(result.records) == 7 and result.warnings == []


@pytest.mark.timeout(20)
def test_symlink_loop_in_data_folder_is_scanned_once(env):
    os.symlink("..", env.img / "loop")  # data/2_zkchar/loop -> data/
    os.symlink(env.img, env.data / "again")
    result = scan_dataset(env.data)
    assert len(result.records) == 6
    assert result.warnings == ["2 folders are the same folder as one already scanned (symlinks, e.g. "
                               f"{env.data / '2_zkchar' / 'loop'}); scanned once"]


def test_caption_with_bom_and_empty_caption(env):
    (env.img / "img0.txt").write_bytes("\ufeffzkchar, bom".encode("utf-8"))
    (env.img / "img1.txt").write_text("  \n")
    result = scan_dataset(env.data)
    captions = {r.path.name: r.caption for r in result.records}
    assert captions["img0.png"] == "zkchar, bom" and captions["img1.png"] == ""
    assert result.warnings == [f"1 caption file is empty (e.g. {env.img / 'img1.png'}); those images train with an "
                               "empty caption"]


@pytest.mark.slow
def test_skip_bad_images_counts_them_and_trains(env, capsys):
    (env.img / "empty.png").write_bytes(b"")
    (env.img / "notes.png").write_text("not pixels")
    data = image_bytes("JPEG")
    (env.img / "cut.jpg").write_bytes(data[: len(data) // 2])
    (env.img / "img0.png").rename(env.img / "img0.jpg")  # harmless; trains with the rest

    code = call_main(env.argv("--skip-bad-images"))

    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "error:" not in err
    assert f"warning: skipped 3 bad files (--skip-bad-images), e.g. {env.img / 'cut.jpg'}: cannot decode image" in err
    assert err.count("warning: skipped") == 1  # one summary line, not one per file
    assert "images: 6 (12 per epoch with repeats), skipped: 3" in out
    assert f"done: {env.out / 'zk.safetensors'}" in out
    assert (env.out / "zk.safetensors").read_bytes() != PREVIOUS_LORA  # the run finished and replaced it
