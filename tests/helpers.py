"""Test helpers importable from every test module (`from helpers import ...`; tests/ is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path


def write_dataset(root: Path, count: int = 6, repeats: int = 2, sizes=((48, 64), (64, 48), (64, 64))) -> Path:
    """`root/<repeats>_zkchar/` with `count` drawn images of varied sizes and .txt captions."""
    import random

    from PIL import Image, ImageDraw

    folder = root / f"{repeats}_zkchar"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    colours = ["red", "blue", "green", "yellow"]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        bg = rng.choice(colours)
        image = Image.new("RGB", (w, h), bg)
        ImageDraw.Draw(image).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill="orange")
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"zkchar, orange circle, {bg} background")
    return root


def odd_exif_photo(path: Path, size=(64, 48), entries: int = 3, truncated: bool = False) -> Path:
    """A JPEG whose EXIF block says orientation 6 (turn 90 degrees: the picture is `size` swapped) and then has a tag
    Pillow cannot read: ResolutionUnit with `entries` values where the spec has one (Pillow keeps the first and warns
    "Metadata Warning, tag 296 had too many entries: <entries>, expected 1", a text per count), or with `truncated`
    values that run off the end of the block (Pillow skips the tag: "Tag data larger than file. Skipping tag 296").
    Phones write such blocks."""
    import struct

    from PIL import Image

    values_at = 8 + 2 + 2 * 12 + 4  # after the header, the entry count, two entries and the next-IFD offset
    ifd = (struct.pack("<H", 2) + struct.pack("<HHLHH", 0x0112, 3, 1, 6, 0)
           + struct.pack("<HHLL", 0x0128, 3, entries + 64 * truncated, values_at) + struct.pack("<L", 0))
    block = b"II*\x00" + struct.pack("<L", 8) + ifd + struct.pack(f"<{entries}H", *[2] * entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 120, 40)).save(path, exif=b"Exif\x00\x00" + block)
    return path


def random_lora_components(pipe, *, rank, alpha, seed, unet_every=1, te_every=1, scale=0.2) -> dict:
    """{component: {module path: LoraModuleWeights}} with random down/up factors (N(0, scale^2)) on every
    `unet_every`-th attn-mlp U-Net module and every `te_every`-th text-encoder linear (SDXL: both encoders)."""
    import torch

    from sd_lora.lora.inject import LoraModuleWeights
    from sd_lora.lora.targets import text_encoder_target_modules, unet_target_modules

    g = torch.Generator().manual_seed(seed)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    encoders = {"text_encoder_1": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2} if sdxl else {"text_encoder": pipe.text_encoder}
    targets = {"unet": (pipe.unet, unet_target_modules(pipe.unet)[::unet_every])}
    targets |= {name: (m, text_encoder_target_modules(m)[::te_every]) for name, m in encoders.items()}
    components = {}
    for component, (model, paths) in targets.items():
        layers = dict(model.named_modules())
        components[component] = {}
        for module in paths:
            shape = layers[module].weight.shape  # (out, in) or (out, in, 1, 1)
            down = torch.randn(rank, *shape[1:], generator=g) * scale
            up = torch.randn(shape[0], rank, *shape[2:], generator=g) * scale
            components[component][module] = LoraModuleWeights(down=down, up=up, alpha=alpha)
    return components


def write_random_lora(path, pipe, *, rank, alpha, seed, unet_every=1, te_every=1, family=None, metadata=None):
    """A kohya file of `random_lora_components`, with family metadata (or `metadata`)."""
    from sd_lora.formats.kohya import save_lora_file, to_kohya_state_dict
    from sd_lora.formats.modelspec import family_metadata
    from sd_lora.formats.sgm import sgm_module_map

    components = random_lora_components(pipe, rank=rank, alpha=alpha, seed=seed, unet_every=unet_every, te_every=te_every)
    sdxl = "text_encoder_2" in components
    if metadata is None:
        metadata = family_metadata(family=family or ("sdxl" if sdxl else "sd1"), prediction_type="epsilon",
                                   resolution=(512, 512), title=Path(path).stem, date="2024-01-01T00:00:00")
    return save_lora_file(path, to_kohya_state_dict(components, sgm_paths=sgm_module_map(pipe.unet) if sdxl else None), metadata)
