"""LoRA linear algebra: a module's weight change, exact merging by rank concatenation, and SVD truncation.

Pure functions on `LoraModuleWeights` (kohya's vocabulary: `delta_W = (alpha / r) * up @ down`) and tensors;
no files, no models. The tools built on them are `merge`, `resize`, `extract` and `models.bake`.

Shapes (r = rank):
    Linear   down (r, in)           up (out, r)         delta (out, in)
    Conv2d   down (r, in, kh, kw)   up (out, r, 1, 1)   delta (out, in, kh, kw)
A conv LoRA is a kxk conv to r channels followed by a 1x1 conv, so flattening `down` to (r, in*kh*kw) turns
every case into the Linear one.

Conventions for what these functions return: factors are float32 (or `dtype`), alpha is a plain float, and
`svd_lowrank` splits the singular values evenly between the factors (up = U sqrt(S), down = sqrt(S) V^T), so
neither factor is much larger than the other when stored in fp16/bf16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sd_lora.lora.inject import LoraModuleWeights

# Norms of low-rank products with at most this many entries are computed densely (exact and cheap); larger ones
# from the factors (SD's 10240x1280 feed-forward layers would need 100 MB and O(out in r) work per module).
_DENSE_NORM_LIMIT = 1 << 18

def _flat(w: LoraModuleWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(up (out, r), down (r, in*kh*kw)) of a Linear or Conv2d LoRA."""
    if w.down.ndim not in (2, 4) or w.up.ndim != w.down.ndim or w.down.shape[0] != w.up.shape[1]:
        raise ValueError(f"not a LoRA pair: down {list(w.down.shape)}, up {list(w.up.shape)}")
    if w.up.ndim == 4 and tuple(w.up.shape[2:]) != (1, 1):
        raise ValueError(f"conv LoRA up must be (out, r, 1, 1), got {list(w.up.shape)}")
    return w.up.flatten(1), w.down.flatten(1)


def delta_shape(w: LoraModuleWeights) -> tuple[int, ...]:
    """The shape of the layer weight `w` changes: (out, in) or (out, in, kh, kw)."""
    _flat(w)
    return (w.up.shape[0], *w.down.shape[1:])


def scale(w: LoraModuleWeights) -> float:
    """alpha / r, the factor between `up @ down` and the weight change."""
    return float(w.alpha) / w.rank


def delta(w: LoraModuleWeights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`(alpha / r) * up @ down` in `dtype`, shaped like the layer's weight (see the module docstring)."""
    up, down = _flat(w)
    product = up.to(dtype) @ down.to(dtype)  # (out, in*kh*kw)
    return (scale(w) * product).reshape(delta_shape(w))


def with_alpha(w: LoraModuleWeights, alpha: float) -> LoraModuleWeights:
    """The same weight change stored with another alpha: the scale difference is folded into `up`.

    Used to give every module of a file one alpha (diffusers assigns alphas by "most common value" plus
    per-module patterns, which is fragile; one alpha for all modules is what every loader handles).
    """
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    factor = float(w.alpha) / alpha
    # at least float32 for the product, so an fp16 `up` is not rounded twice
    up = w.up if factor == 1.0 else w.up.to(torch.promote_types(w.up.dtype, torch.float32)) * factor
    return LoraModuleWeights(down=w.down, up=up, alpha=float(alpha))


def concat(loras: Sequence[tuple[LoraModuleWeights, float]], dtype: torch.dtype = torch.float32) -> LoraModuleWeights:
    """Exact merge: one LoRA whose weight change is `sum(weight_i * delta_i)`, of rank `sum(r_i)`.

    Stacks the `down` blocks and the `up` blocks (each `up_i` multiplied by `weight_i * alpha_i / r_i`) and sets
    alpha = the new rank, so the stored scale is 1. All inputs must change the same layer (same out, in, kernel).
    Factors in `dtype` (float32: exact to ~1e-7 relative; float64 when the result feeds an SVD).
    """
    if not loras:
        raise ValueError("concat needs at least one LoRA")
    shapes = {delta_shape(w) for w, _ in loras}
    if len(shapes) > 1:
        raise ValueError(f"LoRAs change layers of different shapes: {sorted(shapes)}")
    downs = [w.down.to(dtype) for w, _ in loras]
    ups = [w.up.to(dtype) * (float(weight) * scale(w)) for w, weight in loras]
    down, up = torch.cat(downs, dim=0), torch.cat(ups, dim=1)
    return LoraModuleWeights(down=down, up=up, alpha=float(down.shape[0]))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank k whose first k singular values hold at least `energy` of the total sum of squares.

    `singular_values` sorted in descending order (as `torch.linalg.svd` returns them); `energy` in (0, 1].
    At least 1; a zero matrix needs rank 1 (one zero pair).
    """
    if not (0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    squares = singular_values.detach().to(torch.float64) ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    # a relative 1e-12 slack: energy=1.0 must not demand more than the numerical rank
    k = int((kept < energy - 1e-12).sum()) + 1
    return min(k, len(singular_values))


def svd_lowrank(
    delta_or_lora: torch.Tensor | LoraModuleWeights,
    rank: int | None = None,
    *,
    energy: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LoraModuleWeights, float, float]:
    """Best rank-k approximation (Eckart-Young) of a weight change: `(lora, retained_energy, relative_error)`.

    `delta_or_lora`: a dense delta (out, in[, kh, kw]), or a LoRA whose delta is meant (then the SVD runs on
    the small (r, r) core of its factors - the same result, without ever forming the dense matrix).
    k = `rank`, or with `energy` the smallest rank keeping that fraction of sum(sigma^2) (`rank` then caps it),
    never more than the delta's numerical rank (singular values above float64 noise). The result has alpha = k
    (scale 1) and factors in `dtype`.

    retained_energy = sum(kept sigma^2) / sum(sigma^2) (1.0 for a zero delta). relative_error =
    ||delta - delta_k||_F / ||delta||_F measured on the factors *after* rounding to `dtype`, in float64: what a
    file holding them really changes, not the theoretical value.
    """
    if rank is None and energy is None:
        raise ValueError("svd_lowrank needs a rank, an energy, or both")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    if isinstance(delta_or_lora, LoraModuleWeights):
        shape = delta_shape(delta_or_lora)
        u, s, vh, left, right = _factored_svd(delta_or_lora)
    else:
        shape = tuple(delta_or_lora.shape)
        if len(shape) not in (2, 4):
            raise ValueError(f"delta must be 2-D (Linear) or 4-D (Conv2d), got shape {list(shape)}")
        matrix = delta_or_lora.detach().to(torch.float64).flatten(1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        left = right = None

    k = len(s)
    if energy is not None:
        k = rank_for_energy(s, energy)
    if rank is not None:
        k = min(k, rank)
    k = max(1, min(k, _numerical_rank(s, max(shape[0], math.prod(shape[1:])))))

    root = s[:k].sqrt()
    up = u[:, :k] * root  # (out, k)
    down = root[:, None] * vh[:k]  # (k, in*kh*kw)
    if left is not None:  # factored SVD: u, vh are in the bases of the factors' column / row spaces
        up, down = left @ up, down @ right
    up, down = up.to(dtype), down.to(dtype)
    if len(shape) == 4:
        up, down = up.reshape(shape[0], k, 1, 1), down.reshape(k, *shape[1:])
    lora = LoraModuleWeights(down=down, up=up, alpha=float(k))

    squares = s**2
    total = float(squares.sum())
    retained = 1.0 if total == 0.0 else float(squares[:k].sum()) / total
    return lora, retained, _relative_error(delta_or_lora, lora, total)


def _numerical_rank(s: torch.Tensor, size: int) -> int:
    """Singular values above float64 noise (numpy's matrix_rank tolerance): directions worth storing."""
    if len(s) == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > s[0] * size * torch.finfo(torch.float64).eps).sum())


def _factored_svd(w: LoraModuleWeights):
    """SVD of `scale * up @ down` from the factors: u, s, vh of a small core plus the two orthonormal bases.

    up = Q1 R1, down^T = Q2 R2 (Q orthonormal columns)  =>  delta = Q1 (scale R1 R2^T) Q2^T; the core's SVD gives
    delta's, with U = Q1 U_core and V^T = V_core^T Q2^T. Returns (U_core, s, Vh_core, Q1, Q2^T).
    """
    up, down = _flat(w)
    q1, r1 = _orthonormal_split(up.to(torch.float64))  # (out, m1), (m1, r)
    q2, r2 = _orthonormal_split(down.to(torch.float64).T)  # (in, m2), (m2, r)
    u, s, vh = torch.linalg.svd(scale(w) * (r1 @ r2.T), full_matrices=False)
    return u, s, vh, q1, q2.T


def _orthonormal_split(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m = Q R with Q's columns orthonormal, like a reduced QR, but via the SVD (Q = U, R = S V^T).

    Why not `torch.linalg.qr`: with MKL on a busy machine its OpenMP threads make even a 32x14 QR take ~10 ms
    (1000x the single-threaded time); the SVD of the same matrix stays ~0.1 ms. Both are backward stable.
    """
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u, s[:, None] * vh


def relative_error(reference: torch.Tensor | LoraModuleWeights, approx: LoraModuleWeights) -> float:
    """||delta(reference) - delta(approx)||_F / ||delta(reference)||_F in float64 (0 when both are zero)."""
    ref_norm_sq = _frobenius_sq(reference)
    return _relative_error(reference, approx, ref_norm_sq)


def _relative_error(
    reference: torch.Tensor | LoraModuleWeights, approx: LoraModuleWeights, ref_norm_sq: float
) -> float:
    diff_sq = _frobenius_sq_difference(reference, approx)
    if ref_norm_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / ref_norm_sq)


def _frobenius_sq(x: torch.Tensor | LoraModuleWeights) -> float:
    if isinstance(x, LoraModuleWeights):
        up, down = _flat(x)
        return scale(x) ** 2 * _product_norm_sq(up.to(torch.float64), down.to(torch.float64))
    return float((x.detach().to(torch.float64) ** 2).sum())


def _frobenius_sq_difference(reference: torch.Tensor | LoraModuleWeights, approx: LoraModuleWeights) -> float:
    """||delta(reference) - delta(approx)||_F^2 in float64."""
    a_up, a_down = (t.to(torch.float64) for t in _flat(approx))
    a_up = a_up * scale(approx)
    if isinstance(reference, LoraModuleWeights):
        # Both low rank: the difference is [up_ref, -up_a] @ [down_ref; down_a], never formed densely.
        r_up, r_down = (t.to(torch.float64) for t in _flat(reference))
        left = torch.cat([r_up * scale(reference), -a_up], dim=1)
        right = torch.cat([r_down, a_down], dim=0)
        return _product_norm_sq(left, right)
    diff = reference.detach().to(torch.float64).flatten(1) - a_up @ a_down
    return float((diff**2).sum())


def _product_norm_sq(left: torch.Tensor, right: torch.Tensor) -> float:
    """||left @ right||_F^2 = ||R1 R2^T||_F^2 for left = Q1 R1, right^T = Q2 R2 (orthonormal Q).

    O((out + in) K^2) instead of O(out in K), and backward stable: when `left @ right` is a small difference
    of two close deltas, the result is accurate to about 1e-15 of the factors' size (a Gram-matrix formula
    would cancel down to 1e-8).
    """
    if left.shape[0] * right.shape[1] <= _DENSE_NORM_LIMIT:  # small: one matmul beats two SVDs
        return float(((left @ right) ** 2).sum())
    r1 = _orthonormal_split(left)[1]
    r2 = _orthonormal_split(right.T)[1]
    return float(((r1 @ r2.T) ** 2).sum())
