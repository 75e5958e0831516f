"""Load a diffusers model's weights one tensor at a time, cast to the compute dtype as each is read.

diffusers' `from_pretrained` memory-maps the weights file. Casting fp32 weights to bf16 reads every page of the
map, and the pages stay resident until loading ends, so the peak is the whole fp32 file plus the cast model
(SDXL's U-Net: 10.3 GB + 5.2 GB by that arithmetic). Reading each tensor with plain file reads and casting it at once
keeps the peak at the cast model plus one fp32 tensor (SD1.5's U-Net: 2.4 GiB against 5.5 GiB, measured by
benchmarks/load_peak.py). Hand-written because safetensors' own readers all map the file.

Only the common layout streams (one `diffusion_pytorch_model.safetensors` whose keys match the model exactly);
anything else - sharded or `.bin` weights, keys diffusers converts on load, modules it keeps in fp32 - returns
None so that the caller uses diffusers' loader.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import UserError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


MAX_HEADER_BYTES = 200_000_000  # far above any real model's header; a larger length means a damaged file


def read_header(f: BinaryIO, file_size: int) -> tuple[dict, int]:
    """The JSON header of the `.safetensors` file open as `f` (at its start), `__metadata__` included, and the
    offset where tensor data begins. ValueError if the bytes cannot be a safetensors header."""
    raw = f.read(8)
    length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if not 2 <= length <= min(file_size - 8, MAX_HEADER_BYTES):
        raise ValueError("bad header length")
    header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + length


def read_cast(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file `path`, read in file order; floating-point ones cast to `dtype`.
    Only one tensor is held in its stored dtype at a time. A damaged file is a `UserError`; a dtype outside
    `SAFETENSORS_DTYPES` (fp8, ...) a `ValueError`."""
    damaged = f"{path}: the weights file is damaged or truncated; download the model again"
    with open(path, "rb", buffering=0) as f:
        try:
            header, data_start = read_header(f, path.stat().st_size)
            header.pop("__metadata__", None)
            entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        except (ValueError, KeyError, TypeError, AttributeError):  # UnicodeDecodeError is a ValueError
            raise UserError(damaged) from None
        tensors = {}
        for key, entry in entries:
            stored = SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if stored is None:
                raise ValueError(f"{path}: tensor {key} has dtype {entry.get('dtype')}, which this reader does not handle")
            begin, end = entry["data_offsets"]
            shape = entry["shape"]
            if end - begin != math.prod(shape) * stored.itemsize:
                raise UserError(damaged)
            data = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(data) != len(data):
                raise UserError(damaged)
            tensor = torch.frombuffer(data, dtype=stored) if data else torch.empty(0, dtype=stored)
            tensor = tensor.reshape(shape)
            tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return tensors


def empty_model(cls, config: dict) -> torch.nn.Module:
    """`cls` built from `config` with its parameters on the meta device (no memory, no initialisation)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return cls.from_config(config)


def parameter_count(cls, config: dict) -> int:
    return sum(p.numel() for p in empty_model(cls, config).parameters())


def load_cast(cls, folder: Path, dtype: torch.dtype) -> torch.nn.Module | None:
    """The diffusers model `cls` from the component folder `folder` (config.json + weights), its weights in
    `dtype`, in eval mode as `from_pretrained` leaves it; None where diffusers' own loader is needed."""
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() or getattr(cls, "_keep_in_fp32_modules", None):
        return None
    model = empty_model(cls, cls.load_config(folder))
    try:
        model.load_state_dict(read_cast(weights, dtype), strict=True, assign=True)
    except (RuntimeError, ValueError):  # other keys, shapes or dtypes: diffusers converts them or says what is wrong
        return None
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        return None
    return model.eval()
