"""Load a Stable Diffusion base model (SD1.x, SD2.x, SDXL) from a Hugging Face id or a local diffusers folder.

The result is a `BaseModel`: the components we train around plus the facts the rest of the trainer needs
(family, prediction type, native resolution, the pixel step that bucket sizes must respect).
"""

from __future__ import annotations

import difflib
import json
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..precision import vae_dtype
from .checkpoint_detect import ZERO_TERMINAL_SNR_SCHEDULER
from .streaming import load_cast, parameter_count

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_checkpoint_file(model: str) -> bool:
    """Whether `model` (as the user passed it) names a single-file checkpoint, else a diffusers folder or Hub id."""
    path = Path(model).expanduser()
    return path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES


@dataclass
class BaseModel:
    name: str  # what the user passed: a Hub id or a folder path
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    alphas_cumprod: torch.Tensor  # (T,) float32, from the training (DDPM) schedule
    num_train_timesteps: int
    text_encoder_2: torch.nn.Module | None = None  # SDXL: OpenCLIP bigG with projection
    tokenizer_2: object = None
    vae_name: str | None = None  # set when --vae replaced the model's own VAE

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: 2 per VAE down block after the first (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_step(self) -> int:
        """Image sides must be multiples of this (64 px for SD): VAE factor x U-Net downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def bucket_step(self) -> int:
        """Bucket sides are multiples of this: the pixel step, but at least 64 px for full-size models as
        kohya uses (SDXL's own step is 32 px)."""
        return max(self.pixel_step, 64) if self.native_resolution >= 512 else self.pixel_step

    @property
    def native_resolution(self) -> int:
        """Resolution the model was trained at (512 for SD1.5, 768 for SD2.1-v)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor


def _check_local_folder(path: Path) -> None:
    if path.is_file():
        folder = "a diffusers folder (model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        raise UserError(f"--model {path}: is a file, not a model; pass a single-file checkpoint "
                        f"({'/'.join(CHECKPOINT_SUFFIXES)}), {folder} or a Hugging Face id")
    if not (path / "model_index.json").is_file():
        checkpoints = sorted(f.name for f in path.iterdir() if f.suffix.lower() in CHECKPOINT_SUFFIXES and f.is_file())
        inside = (f"; it holds the checkpoint file{'s' if len(checkpoints) > 1 else ''} {', '.join(checkpoints[:3])}: "
                  f"pass {'one' if len(checkpoints) > 1 else 'it'} as --model") if checkpoints else ""
        raise UserError(
            f"--model {path}: not a diffusers model folder (no model_index.json){inside}. Pass the folder that holds "
            "model_index.json, a single-file checkpoint, or a Hugging Face id such as stable-diffusion-v1-5/stable-diffusion-v1-5"
        )
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise UserError(f"--model {path}: the diffusers folder lacks {', '.join(m + '/' for m in missing)}; it is incomplete or not a Stable Diffusion model")


def _variant(folder: Path) -> str | None:
    """"fp16" for a component folder that holds only fp16-variant weights (`*.fp16.safetensors`, as
    `huggingface-cli download --include '*fp16*'` or `variant="fp16"` leave it); diffusers and transformers look
    only for the plain names unless told the variant."""
    files = [f.name for f in folder.iterdir()] if folder.is_dir() else []
    fp16 = re.compile(r"\.fp16[.-]")  # model.fp16.safetensors, sharded model.fp16-00001-of-00002.safetensors
    plain = [f for f in files if f.endswith((".safetensors", ".bin")) and not fp16.search(f)]
    return "fp16" if not plain and any(fp16.search(f) for f in files) else None


def _did_you_mean(path: Path) -> str:
    """"; did you mean <sibling>?" for a missing local path whose folder exists and holds a similar name."""
    parent = path.parent
    if not parent.is_dir():
        return ""
    close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1)
    return f"; did you mean {parent / close[0]}?" if close else ""


def _local_typo_hint(path: Path) -> str:
    """For a name read as a Hub id whose first part is a local folder ("models/sd15" with ./models present):
    most likely a mistyped local path, so say it is not there and what is."""
    if path.parent == Path(".") or not path.parent.is_dir():
        return ""
    return f" (there is no local folder {path}{_did_you_mean(path)})"


def _read_model_index(path: Path) -> dict:
    index = path / "model_index.json"
    try:
        model_index = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--model {path}: {index.name} is not valid JSON ({e}); the download may be incomplete, "
                        "fetch the model again") from None
    except OSError as e:
        raise UserError(f"--model {path}: cannot read {index.name} ({e.strerror or e})") from None
    if not isinstance(model_index, dict):
        raise UserError(f"--model {path}: {index.name} should hold a JSON object, not {type(model_index).__name__}; "
                        "the folder is not a diffusers model")
    return model_index


def detect_family(unet_config: dict, model_index: dict, where: str) -> str:
    """'sd1', 'sd2' or 'sdxl' from the U-Net config and the pipeline's component list."""
    if unet_config.get("addition_embed_type") == "text_time":
        if model_index and "text_encoder_2" not in model_index:
            raise UserError(f"--model {where}: an SDXL U-Net without text_encoder_2 (a refiner?) cannot be trained; "
                            "pass an SDXL base-architecture model (SDXL 1.0, Pony, Illustrious, NoobAI, ...)")
        return "sdxl"
    if "text_encoder_2" in model_index:
        raise UserError(f"--model {where}: two text encoders but no SDXL U-Net: this architecture is not supported")
    cross = unet_config.get("cross_attention_dim")
    if cross == 768:
        return "sd1"
    if cross == 1024:
        return "sd2"
    # Smaller research/test models: SD2 introduced linear projections in the transformer blocks.
    return "sd2" if unet_config.get("use_linear_projection") else "sd1"


def load_base_model(name: str, *, prediction_type: str | None = None, vae: str | None = None,
                    zero_terminal_snr: bool = False, allow_unsafe_pickle: bool = False,
                    model_config: str | None = None, dtype_for: Callable[[int], torch.dtype] | None = None) -> BaseModel:
    """Load every component on the CPU, in fp32 unless `dtype_for` says otherwise; the caller moves them.

    `dtype_for(unet_parameters)`, given the U-Net's parameter count (from its config, on the meta device, before
    any weight is read), picks the dtype the frozen weights are kept in. The model's own components load
    straight into it, so no fp32 copy exists; a local folder's U-Net is read tensor by tensor (`streaming.load_cast`), so its
    fp32 file is never resident at once either. SDXL's VAE stays fp32 under fp16 (it overflows); a `vae` loads
    in fp32, and `prepare_models` casts it to fp16 only when its config says `force_upcast: false`.

    `name` is a Hub id, a diffusers folder, or a single-file checkpoint (`.safetensors`; `.ckpt`/`.pt` only with
    `allow_unsafe_pickle`), read offline against shipped full-size configs or the diffusers folder `model_config`.

    `vae` replaces the model's VAE (a diffusers AutoencoderKL folder, a single `.safetensors` file read under the
    model's own VAE config, or a Hub id, e.g. an fp16-safe SDXL VAE);
    `zero_terminal_snr` rescales the noise schedule so its last step is pure noise (Lin et al. 2023).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(name).expanduser()
    if is_checkpoint_file(name):
        return _load_checkpoint_file(name, path, prediction_type=prediction_type, vae=vae, zero_terminal_snr=zero_terminal_snr,
                                     allow_unsafe_pickle=allow_unsafe_pickle, model_config=model_config, dtype_for=dtype_for)
    if not path.exists() and path.suffix.lower() in CHECKPOINT_SUFFIXES:  # not a Hub id: a mistyped file name
        raise UserError(f"--model {name}: no such file{_did_you_mean(path)}")
    if path.exists():
        _check_local_folder(path)
        source = str(path)
        model_index = _read_model_index(path)
    elif HUB_ID.match(name):
        source = name
        model_index = {}
    else:
        raise UserError(f"--model {name}: no such folder, and not a Hugging Face id of the form 'org/name'")

    fix = ("the folder is incomplete or damaged; download the model again" if path.exists() else
           "check the id, your network and, for gated models, your Hugging Face login; or pass a local diffusers folder"
           + _local_typo_hint(path))

    def load(cls, sub, method="from_pretrained", **kwargs):
        if method == "from_pretrained" and path.exists() and (variant := _variant(path / sub)):
            kwargs["variant"] = variant
        try:
            return getattr(cls, method)(source, subfolder=sub, **kwargs)
        except OSError as e:  # missing files, no network for a Hub id, gated repo ...
            raise UserError(f"--model {name}: cannot load {sub}/ ({str(e).splitlines()[0].strip().rstrip('.')}); {fix}") from None

    unet_config = load(UNet2DConditionModel, "unet", method="load_config")
    family = detect_family(unet_config, model_index, name)
    if unet_config.get("in_channels", 4) != 4:  # as detect_from_shapes refuses such single-file checkpoints
        raise UserError(f"--model {name}: the U-Net takes {unet_config['in_channels']} input channels (an inpainting, depth or "
                        "instruct-pix2pix model?); only text-to-image models with 4 latent channels can be trained")
    dtype = dtype_for(parameter_count(UNet2DConditionModel, unet_config)) if dtype_for else torch.float32
    unet = None
    if dtype != torch.float32 and path.exists():  # a cast: read tensor by tensor, never the whole fp32 file at once
        unet = load_cast(UNet2DConditionModel, path / "unet", dtype)
    if unet is None:
        unet = load(UNet2DConditionModel, "unet", **({} if dtype == torch.float32 else {"torch_dtype": dtype}))
    # Always given: transformers 5 otherwise loads the dtype the file holds (fp16 in many published folders).
    text_dtype = {"dtype": dtype}  # transformers' name for torch_dtype
    scheduler = load(DDPMScheduler, "scheduler")
    # --prediction-type goes into the scheduler config too: the sample grids' schedulers are built from it
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    own = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type and prediction_type != own:  # deliberate, or a value carried over from another model's config.toml
        print(f"warning: --model {name}: its scheduler predicts {own}, but --prediction-type {prediction_type} trains it to "
              f"predict {prediction_type}. Unless that is meant (e.g. a mislabelled model), drop --prediction-type, or its line "
              "in the --config file if that came from another model's run", file=sys.stderr)
    if zero_terminal_snr:
        overrides |= ZERO_TERMINAL_SNR_SCHEDULER
    if overrides:
        scheduler = DDPMScheduler.from_config(scheduler.config, **overrides)
    model = BaseModel(
        name=name,
        family=family,
        prediction_type=scheduler.config.get("prediction_type", "epsilon"),
        unet=unet,
        vae=(_replacement_vae(vae, load(AutoencoderKL, "vae", method="load_config"), unet.config, family) if vae
             else load(AutoencoderKL, "vae", torch_dtype=vae_dtype(family, dtype))),
        text_encoder=load(CLIPTextModel, "text_encoder", **text_dtype),
        tokenizer=load(CLIPTokenizer, "tokenizer"),
        scheduler_config=dict(scheduler.config),
        alphas_cumprod=scheduler.alphas_cumprod.float().clone(),
        num_train_timesteps=int(scheduler.config.num_train_timesteps),
        vae_name=vae,
    )
    if family == "sdxl":
        model.text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2", **text_dtype)
        model.tokenizer_2 = load(CLIPTokenizer, "tokenizer_2")
    return _checked(model, name)


def _checked(model: BaseModel, name: str) -> BaseModel:
    if model.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"--model {name}: prediction type {model.prediction_type!r} is not supported (epsilon or v_prediction)")
    return model


def _replacement_vae(name: str, own_config, unet_config, family: str):
    """The --vae AutoencoderKL, refused when it cannot stand in for the model's own VAE (config `own_config`):
    latents of another channel count, or another latent scale (an SD1.x VAE, scaling_factor 0.18215, on SDXL,
    0.13025: it trains without error on latents the U-Net never saw)."""
    path = Path(name).expanduser()
    vae = _load_vae_file(name, path, own_config, family) if path.is_file() else _load_vae(name)
    if vae.config.latent_channels != unet_config["in_channels"]:
        raise UserError(f"--vae {name}: makes {vae.config.latent_channels}-channel latents, but the {family} U-Net takes "
                        f"{unet_config['in_channels']}; it is a VAE for another architecture. Pass a VAE made for {family}, "
                        "or drop --vae to use the model's own")
    own, given = float(own_config.get("scaling_factor", 0.18215)), float(vae.config.scaling_factor)
    if abs(own - given) > 1e-6:
        raise UserError(f"--vae {name}: its scaling_factor is {given:g}, the model's own VAE uses {own:g}; it is a VAE "
                        f"for another family (SD1.x/SD2.x use 0.18215, SDXL 0.13025). Pass a VAE made for {family}, or "
                        "drop --vae to use the model's own")
    return vae


def _load_vae_file(name: str, path: Path, own_config, family: str):
    """A single-file VAE (A1111's `vae-ft-mse-840000-ema-pruned.safetensors`, `sdxl_vae.safetensors`) under the
    model's own VAE config: the file holds weights only, so it is taken to be the model's VAE architecture and
    latent scale, as A1111 and ComfyUI take it. diffusers' single-file conversion reads the original (LDM) names."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    from .single_file import conversion_error

    if path.suffix.lower() != ".safetensors":
        raise UserError(f"--vae {name}: only .safetensors single-file VAEs are read ({path.suffix} files are Python pickles, "
                        "which can run code); convert it to .safetensors, or pass a diffusers VAE folder")
    with tempfile.TemporaryDirectory(prefix="sd_lora_vae_") as tmp:
        (Path(tmp) / "vae").mkdir()
        (Path(tmp) / "vae" / "config.json").write_text(json.dumps(dict(own_config)))
        try:
            vae = AutoencoderKL.from_single_file(str(path), config=tmp, subfolder="vae", local_files_only=True)
        except (SingleFileComponentError, ValueError, RuntimeError, KeyError, OSError) as e:  # not a VAE, other shapes
            raise UserError(f"--vae {name}: cannot load it as the {family} model's VAE ({conversion_error(e)}); pass a single-file "
                            f"VAE made for {family}, or a diffusers VAE folder") from None
    if any(t.is_meta for t in vae.state_dict().values()):
        raise UserError(f"--vae {name}: holds no weights for part of the VAE; it is not a {family} VAE file")
    return vae


def _load_vae(name: str):
    """An AutoencoderKL from a folder (its own, or a pipeline's vae/ subfolder) or a Hub id."""
    from diffusers import AutoencoderKL

    path = Path(name).expanduser()
    attempts = [dict(), dict(subfolder="vae")]
    if path.exists() and not (path / "config.json").is_file():
        attempts = [dict(subfolder="vae")]
    for kwargs in attempts:
        try:
            return AutoencoderKL.from_pretrained(str(path) if path.exists() else name, **kwargs)
        except (OSError, ValueError):
            continue
    raise UserError(f"--vae {name}: cannot load an AutoencoderKL from it; pass a diffusers VAE folder (config.json + "
                    "diffusion_pytorch_model.safetensors), a model folder with vae/, a single-file .safetensors VAE, "
                    "or a Hugging Face id")


def _load_checkpoint_file(name: str, path: Path, *, prediction_type, vae, zero_terminal_snr, allow_unsafe_pickle,
                          model_config, dtype_for) -> BaseModel:
    """A single-file checkpoint, converted offline into diffusers components; prints what was detected."""
    from diffusers import DDPMScheduler

    from .single_file import load_single_file

    parts = load_single_file(path, prediction_type=prediction_type, allow_unsafe_pickle=allow_unsafe_pickle,
                             config_dir=model_config, dtype_for=dtype_for)
    print(f"--model {name}: {parts['info']}")
    config = dict(parts["scheduler_config"])
    if zero_terminal_snr:
        config.update(ZERO_TERMINAL_SNR_SCHEDULER)
    scheduler = DDPMScheduler.from_config(config)
    model = BaseModel(
        name=name, family=parts["family"], prediction_type=parts["prediction_type"], unet=parts["unet"],
        vae=_replacement_vae(vae, parts["vae"].config, parts["unet"].config, parts["family"]) if vae else parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        scheduler_config=dict(scheduler.config), alphas_cumprod=scheduler.alphas_cumprod.float().clone(),
        num_train_timesteps=int(scheduler.config.num_train_timesteps), text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"), vae_name=vae,
    )
    return _checked(model, name)
