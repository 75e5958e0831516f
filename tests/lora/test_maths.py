"""LoRA maths: deltas, exact concatenation, SVD truncation with honest errors, rank for an energy."""

from __future__ import annotations

import math

import pytest
import torch

from sd_lora.lora.inject import LoraModuleWeights
from sd_lora.lora.maths import concat, delta, rank_for_energy, relative_error, svd_lowrank, with_alpha


def _lora(out: int, inp: int, rank: int, alpha: float, seed: int, kernel: int | None = None) -> LoraModuleWeights:
    g = torch.Generator().manual_seed(seed)
    if kernel is None:
        return LoraModuleWeights(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), alpha)
    down = torch.randn(rank, inp, kernel, kernel, generator=g)
    return LoraModuleWeights(down, torch.randn(out, rank, 1, 1, generator=g), alpha)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _spectrum_matrix(out: int, inp: int, sigmas: list[float], seed: int = 0) -> torch.Tensor:
    """A dense (out, inp) matrix with exactly these singular values."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(sigmas), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, len(sigmas), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(sigmas, dtype=torch.float64)) @ v.T


def test_delta_linear_and_conv_match_the_definition():
    w = _lora(6, 5, 3, alpha=1.5, seed=0)
    assert torch.allclose(delta(w), 0.5 * w.up @ w.down, atol=1e-6)
    conv = _lora(6, 5, 3, alpha=6.0, seed=1, kernel=3)
    d = delta(conv)
    assert d.shape == (6, 5, 3, 3)
    # a kxk conv to r channels then a 1x1 conv: apply both convs and compare with one conv by the delta
    x = torch.randn(1, 5, 7, 7)
    two_convs = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, conv.down), conv.up) * 2.0
    assert torch.allclose(torch.nn.functional.conv2d(x, d), two_convs, atol=1e-4)


def test_concat_is_exact_sum_of_weighted_deltas():
    a, b, c = _lora(12, 9, 4, 2.0, 0), _lora(12, 9, 3, 7.0, 1), _lora(12, 9, 2, 2.0, 2)
    merged = concat([(a, 0.7), (b, 0.3), (c, -1.2)])
    assert merged.rank == 9 and merged.alpha == 9.0
    expected = 0.7 * delta(a, torch.float64) + 0.3 * delta(b, torch.float64) - 1.2 * delta(c, torch.float64)
    assert _rel(delta(merged, torch.float64), expected) < 1e-6
    assert _rel(delta(concat([(a, 0.7), (b, 0.3), (c, -1.2)], torch.float64), torch.float64), expected) < 1e-12


def test_concat_conv_and_shape_mismatch():
    a, b = _lora(6, 4, 2, 1.0, 0, kernel=1), _lora(6, 4, 3, 3.0, 1, kernel=1)
    merged = concat([(a, 1.0), (b, 0.5)])
    assert merged.down.shape == (5, 4, 1, 1) and merged.up.shape == (6, 5, 1, 1)
    assert _rel(delta(merged), delta(a) + 0.5 * delta(b)) < 1e-6
    with pytest.raises(ValueError, match="different shapes"):
        concat([(_lora(6, 4, 2, 1.0, 0), 1.0), (_lora(6, 5, 2, 1.0, 0), 1.0)])


def test_with_alpha_keeps_the_delta():
    w = _lora(8, 6, 4, 1.0, 3)
    moved = with_alpha(w, 16.0)
    assert moved.alpha == 16.0
    assert _rel(delta(moved), delta(w)) < 1e-6


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0])  # squares 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert rank_for_energy(s, 0.5) == 1
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 0.95) == 3
    assert rank_for_energy(s, 1.0) == 3
    assert rank_for_energy(torch.tensor([1.0, 0.0, 0.0]), 1.0) == 1  # numerical rank, not the size
    assert rank_for_energy(torch.zeros(3), 0.9) == 1
    for bad in (0.0, -0.1, 1.01, math.nan):
        with pytest.raises(ValueError):
            rank_for_energy(s, bad)


@pytest.mark.parametrize("factored", [False, True])
def test_svd_truncation_reports_the_eckart_young_error(factored):
    sigmas = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    dense = _spectrum_matrix(20, 14, sigmas)
    source = dense
    if factored:  # the same delta given as a LoRA (rank 6, alpha 3: scale 0.5)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        source = LoraModuleWeights(down=vh[:6], up=2 * u[:, :6] * s[:6], alpha=3.0)
        assert _rel(delta(source, torch.float64), dense) < 1e-12
    total = sum(x * x for x in sigmas)
    for k in range(1, 7):
        lora, energy, error = svd_lowrank(source, k, dtype=torch.float64)
        assert lora.rank == k and lora.alpha == k
        assert energy == pytest.approx(sum(x * x for x in sigmas[:k]) / total, rel=1e-9)
        expected_error = math.sqrt(sum(x * x for x in sigmas[k:]) / total)
        assert error == pytest.approx(expected_error, rel=1e-6, abs=1e-12)
        assert error == pytest.approx(_rel(delta(lora, torch.float64), dense), rel=1e-6, abs=1e-12)
    assert svd_lowrank(source, 6, dtype=torch.float64)[2] < 1e-12  # full rank: exact
    assert svd_lowrank(source, 50, dtype=torch.float64)[0].rank == 6  # never above the delta's rank


def test_svd_energy_picks_the_smallest_rank_meeting_it():
    sigmas = [5.0, 3.0, 2.0, 1.0, 1.0, 0.5]
    dense = _spectrum_matrix(16, 12, sigmas, seed=4)
    squares = torch.tensor(sigmas) ** 2
    for energy in (0.5, 0.8, 0.9, 0.97, 0.99, 1.0):
        lora, kept, _ = svd_lowrank(dense, energy=energy)
        k = lora.rank
        assert kept >= energy - 1e-9
        assert float(squares[: k - 1].sum() / squares.sum()) < energy  # one less would not do
    assert svd_lowrank(dense, 2, energy=0.99)[0].rank == 2  # --rank caps --energy


def test_svd_conv_kernel_and_storage_rounding():
    conv = _lora(8, 5, 4, 4.0, 5, kernel=3)
    lora, energy, error = svd_lowrank(delta(conv), 4)
    assert lora.down.shape == (4, 5, 3, 3) and lora.up.shape == (8, 4, 1, 1)
    assert energy == pytest.approx(1.0) and error < 1e-6
    # fp16 factors: the reported error is the rounded file's, not the ideal one
    half, _, half_error = svd_lowrank(conv, 4, dtype=torch.float16)
    assert half.down.dtype == torch.float16
    assert 1e-5 < half_error < 1e-2
    assert half_error == pytest.approx(relative_error(conv, half), rel=1e-9)
    assert half_error == pytest.approx(_rel(delta(half, torch.float64), delta(conv, torch.float64)), rel=1e-4)


def test_svd_of_zero_delta():
    lora, energy, error = svd_lowrank(torch.zeros(5, 4), 2)
    assert (energy, error) == (1.0, 0.0)
    assert torch.count_nonzero(delta(lora)) == 0
    with pytest.raises(ValueError):
        svd_lowrank(torch.zeros(5, 4), 0)


def test_factored_norms_match_dense(monkeypatch):
    """Big modules' norms come from the factors; force that path on small ones and compare with dense maths."""
    import sd_lora.lora.maths as maths

    a, b = _lora(30, 20, 5, 2.0, 7), _lora(30, 20, 3, 1.0, 8)
    close = LoraModuleWeights(down=a.down, up=a.up.double() * (1 + 1e-9), alpha=a.alpha)  # tiny difference
    dense = [relative_error(delta(a, torch.float64), b), relative_error(delta(a, torch.float64), close)]
    monkeypatch.setattr(maths, "_DENSE_NORM_LIMIT", 0)
    factored = [relative_error(a, b), relative_error(a, close)]
    assert factored[0] == pytest.approx(dense[0], rel=1e-12)
    assert factored[1] == pytest.approx(1e-9, rel=1e-5) and dense[1] == pytest.approx(1e-9, rel=1e-5)
