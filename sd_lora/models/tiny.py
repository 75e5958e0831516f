"""Tiny Stable Diffusion pipelines built from config in code, saved as ordinary diffusers folders.

Tests (and the interim demo) load these folders through exactly the code path a user's real model takes,
so nothing is downloaded. The architectures are the real ones (`UNet2DConditionModel`, `AutoencoderKL`,
`CLIPTextModel`, a CLIP BPE tokenizer), only narrow and shallow.

    python -m sd_lora.models.tiny OUT_DIR [--family sd1|sd2|sd2-v|sdxl] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

# Words the tiny tokenizer learns merges for, so short captions stay well under 77 tokens.
DEFAULT_WORDS = (
    "a an the and of on in with at to by photo picture drawing portrait style character person "
    "red green blue yellow orange purple pink white black gray brown circle square triangle star "
    "small large big tiny background standing sitting smiling face hair eyes solo zkchar"
).split()

FAMILIES = ("sd1", "sd2", "sd2-v")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def learn_bpe_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy byte-pair merges over `words` (each word ends with `</w>`, as CLIP's BPE expects)."""
    alphabet = bytes_to_unicode()
    corpus = Counter(
        tuple([alphabet[b] for b in w.encode()][:-1] + [alphabet[w.encode()[-1]] + "</w>"])
        for w in words
        if w
    )
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])  # sorted first: ties break deterministically
        merges.append(best)
        merged: Counter = Counter()
        for symbols, freq in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        corpus = merged
    return merges


def write_clip_tokenizer(directory: Path, words: list[str] | None = None, num_merges: int = 400) -> Path:
    """Write CLIP tokenizer files (vocab.json, merges.txt, configs) that load offline with `CLIPTokenizer`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe_merges(list(words or DEFAULT_WORDS), num_merges)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,  # the default is a huge integer that breaks max_length padding
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return directory


def tiny_vae(**overrides):
    """A 2-level AutoencoderKL (2x down, 4 latent channels), the same for every tiny family."""
    from diffusers import AutoencoderKL

    config = dict(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, sample_size=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    return AutoencoderKL(**(config | overrides))


def build_tiny_pipeline(family: str = "sd1", seed: int = 0, tokenizer_dir: Path | None = None):
    """A `StableDiffusionPipeline` with SD1.x (`sd1`) or SD2.x (`sd2`, `sd2-v`) layout, a few MB in size.

    `sd1` has 1x1-conv `proj_in/proj_out` and epsilon prediction; `sd2` uses linear projections, GELU CLIP
    and upcast attention; `sd2-v` is `sd2` with v-prediction, like SD2.1-768.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    sd2 = family != "sd1"
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="sd_lora_tok_") as tmp:  # the loaded tokenizer lives in memory
            tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp))))
    else:
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 8,
        norm_num_groups=8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction" if family == "sd2-v" else "epsilon",
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_model(directory: Path, family: str = "sd1", seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder (safetensors weights)."""
    directory = Path(directory)
    pipe = build_tiny_pipeline(family, seed)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


# Tiny SDXL widths. The two text encoders differ in width (and depth), so a LoRA written for one cannot
# silently load into the other.
SDXL_TEXT_ENCODER_1_HIDDEN = 32  # CLIPTextModel, quick_gelu, 3 layers (ViT-L's role)
SDXL_TEXT_ENCODER_2_HIDDEN = 48  # CLIPTextModelWithProjection, gelu, 4 layers (bigG's role)
SDXL_POOLED_DIM = 32  # TE2 projection_dim: the pooled text embedding the U-Net's add_embedding reads
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim: each of the 6 micro-conditioning values -> 8 features
TINY_SDXL_UNET_CONFIG = dict(  # SDXL base's layout (model-configs.md) with 2 of its 3 levels, narrow
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=SDXL_TEXT_ENCODER_1_HIDDEN + SDXL_TEXT_ENCODER_2_HIDDEN,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_POOLED_DIM,
)


def build_tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon", tokenizer_dir: Path | None = None):
    """A `StableDiffusionXLPipeline` with the SDXL architecture, a few MB in size.

    Like SDXL base: two text encoders (`CLIPTextModel` + `CLIPTextModelWithProjection`) whose penultimate
    hidden states are concatenated (cross_attention_dim = 32 + 48), "text_time" micro-conditioning
    (projection_class_embeddings_input_dim = 6 * 8 + pooled 32), linear proj_in/out, a first down block
    without attention and a deeper transformer in the second (transformer_layers_per_block (1, 2)), and an
    Euler scheduler with SDXL's betas. `tokenizer_dir` (optional) holds `tokenizer/` and `tokenizer_2/`, written
    there when missing; TE2's tokenizer pads with "!" as SDXL's does.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if tokenizer_dir is None:
        with tempfile.TemporaryDirectory(prefix="sd_lora_sdxl_tok_") as tmp:  # the loaded tokenizers live in memory
            tokenizer, tokenizer_2 = sdxl_tokenizers(Path(tmp))
    else:
        tokenizer, tokenizer_2 = sdxl_tokenizers(Path(tokenizer_dir))

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
    vae = tiny_vae(scaling_factor=0.13025)  # SDXL's VAE scaling

    def clip_config(tok, hidden: int, layers: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act=act,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            projection_dim=SDXL_POOLED_DIM,
        )

    text_encoder = CLIPTextModel(clip_config(tokenizer, SDXL_TEXT_ENCODER_1_HIDDEN, 3, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2, SDXL_TEXT_ENCODER_2_HIDDEN, 4, "gelu"))
    scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler config
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def sdxl_tokenizers(directory: Path):
    """SDXL's two CLIP tokenizers from `directory/tokenizer{,_2}`, written there first when missing; the second
    pads with "!" as SDXL's does."""
    from transformers import CLIPTokenizer

    for sub, pad in (("tokenizer", None), ("tokenizer_2", "!")):
        if not (directory / sub / "vocab.json").is_file():
            write_clip_tokenizer(directory / sub)
            if pad is not None:
                _set_pad_token(directory / sub, pad)
    return CLIPTokenizer.from_pretrained(str(directory / "tokenizer")), CLIPTokenizer.from_pretrained(str(directory / "tokenizer_2"))


def _set_pad_token(directory: Path, pad_token: str) -> None:
    """Rewrite the pad token in the tokenizer files `write_clip_tokenizer` wrote."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        config = json.loads(path.read_text())
        config["pad_token"] = pad_token
        path.write_text(json.dumps(config, indent=2))


def save_tiny_sdxl_model(directory: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build a tiny SDXL pipeline and save it as a diffusers folder (safetensors weights)."""
    directory = Path(directory)
    pipe = build_tiny_sdxl_pipeline(seed, prediction_type)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


CLI_FAMILIES = FAMILIES + ("sdxl",)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sd_lora.models.tiny", description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--family", choices=CLI_FAMILIES, default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.family == "sdxl":
        save_tiny_sdxl_model(args.output_dir, args.seed)
    else:
        save_tiny_model(args.output_dir, args.family, args.seed)
    print(f"tiny {args.family} model written to {args.output_dir}")


if __name__ == "__main__":
    main()
