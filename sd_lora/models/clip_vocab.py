"""The real CLIP tokenizer (vocab.json, merges.txt) built from the BPE vocabulary an installed package ships.

Single-file checkpoints carry no tokenizer, and we never download one at run time. OpenAI's CLIP, and every
Stable Diffusion text encoder after it (SD1.x ViT-L, SD2.x OpenCLIP ViT-H, both SDXL encoders), use one
byte-level BPE vocabulary of 49408 tokens. OpenCLIP ships it as `open_clip/bpe_simple_vocab_16e6.txt.gz`
(OpenAI's `clip` package as `clip/bpe_simple_vocab_16e6.txt.gz`): the first 48894 merges of that file, in
order, define the vocabulary exactly as OpenAI's `SimpleTokenizer` builds it:

    256 byte characters, the same 256 with `</w>`, one token per merge, `<|startoftext|>`, `<|endoftext|>`

which is also how the Hugging Face `openai/clip-vit-large-patch14` files are laid out (ids 49406 / 49407 for
start / end). `clip_tokenizer_dir()` writes these files once into a cache folder and returns it:

    CLIPTokenizer.from_pretrained(clip_tokenizer_dir())            # SD1.x, SDXL text encoder 1
    CLIPTokenizer.from_pretrained(clip_tokenizer_dir(pad="!"))     # SD2.x, SDXL text encoder 2 pad with "!"
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from .tiny import bytes_to_unicode

VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # OpenAI's SimpleTokenizer: merges[1 : 49152 - 256 - 2 + 1]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_TOKENS = {EOS: "clip", "!": "clip-pad-exclamation"}  # pad token -> cache sub-folder name
# (package, file inside it) in order of preference; any one of them is enough.
BPE_SOURCES = (("open_clip", "bpe_simple_vocab_16e6.txt.gz"), ("clip", "bpe_simple_vocab_16e6.txt.gz"))
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/sd_lora/clip-tokenizer` (default `~/.cache/sd_lora/clip-tokenizer`)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sd_lora" / "clip-tokenizer"


def find_bpe_file() -> Path:
    """The CLIP BPE vocabulary from an installed package, found without importing the package (and torch)."""
    for package, name in BPE_SOURCES:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            path = Path(location) / name
            if path.is_file():
                return path
    wanted = " or ".join(f"{p}/{n}" for p, n in BPE_SOURCES)
    raise UserError(f"the CLIP tokenizer vocabulary ({wanted}) was not found; install it with "
                    "`pip install open-clip-torch` (a dependency of sd_lora, so reinstalling sd_lora also works)")


def read_merges(bpe_file: Path | None = None) -> list[tuple[str, str]]:
    """The 48894 BPE merges CLIP uses, in rank order."""
    bpe_file = bpe_file or find_bpe_file()
    lines = gzip.decompress(Path(bpe_file).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise UserError(f"{bpe_file}: not CLIP's BPE vocabulary ({len(merges)} merges read, {NUM_MERGES} expected); "
                        "reinstall open-clip-torch")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """token -> id, in OpenAI's order (`SimpleTokenizer.encoder`)."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) == VOCAB_SIZE, "duplicate tokens in the CLIP vocabulary"
    return vocab


def tokenizer_config(pad_token: str = EOS) -> dict:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,  # the default is a huge integer that breaks max_length padding
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }


def write_clip_tokenizer_files(directory: str | os.PathLike, *, pad: str = EOS, bpe_file: Path | None = None) -> Path:
    """Write the full CLIP tokenizer into `directory` (created; existing files overwritten)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = read_merges(bpe_file)
    vocab = build_vocab(merges)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = tokenizer_config(pad)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return directory


def clip_tokenizer_dir(pad: str = EOS, cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding the CLIP tokenizer files, written on first use and reused afterwards.

    `pad` is the padding token: `<|endoftext|>` (SD1.x, SDXL text encoder 1) or `"!"` (SD2.x, SDXL text
    encoder 2). The folder is built in a temporary sibling and renamed into place, so concurrent first uses
    and interrupted writes never leave a half-written tokenizer behind.
    """
    if pad not in PAD_TOKENS:
        raise ValueError(f"pad must be one of {sorted(PAD_TOKENS)}, got {pad!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / PAD_TOKENS[pad]
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        write_clip_tokenizer_files(staging, pad=pad)
        # Checked again: another process (each rank of a multi-GPU run loads the model) may have finished first, and
        # deleting its folder would pull the files from under it while it copies them. Its files are identical.
        if _complete(target):
            return target
        if target.exists():  # incomplete leftover from an older version: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished in between
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TOKENIZER_FILES)
