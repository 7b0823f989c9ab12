"""Craterless surrogates (data/surrogates.py): the phase scramble keeps the amplitude spectrum and the mean and
draws uniform phases; smooth noise has the asked spread and smoothness."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import kstest

from data.datasets import load_mars_craters
from data.surrogates import CRATERLESS, craterless_sets, phase_scramble, smooth_noise


def test_phase_scramble_keeps_the_amplitude_spectrum_and_draws_uniform_phases():
    x, _ = load_mars_craters(split="heldout", size=32)
    s = phase_scramble(x, torch.Generator().manual_seed(0))
    assert s.shape == x.shape and s.dtype == torch.float32
    fx, fs = torch.fft.fft2(x.double()), torch.fft.fft2(s.double())
    np.testing.assert_allclose(fs.abs().numpy(), fx.abs().numpy(), atol=1e-6 * float(fx.abs().max()))
    torch.testing.assert_close(s.double().mean((2, 3)), x.double().mean((2, 3)), atol=1e-6, rtol=0)
    # the phases: uniform on (−π, π] (Kolmogorov-Smirnov over the non-self-conjugate frequencies), independent of
    # the tile's own phases, and a fresh draw per tile
    k = (slice(None), 0, slice(1, 16), slice(1, 16))
    phase = torch.angle(fs[k]).flatten().numpy()
    assert kstest(phase, "uniform", args=(-math.pi, 2 * math.pi)).pvalue > 1e-3
    shift = np.angle(np.exp(1j * (phase - torch.angle(fx[k]).flatten().numpy())))
    assert kstest(shift, "uniform", args=(-math.pi, 2 * math.pi)).pvalue > 1e-3
    assert not torch.allclose(s[0], s[1])
    # the same generator state gives the same surrogates; the structure is gone (the tiles' pixels, each about
    # its own mean, no longer correlate with the surrogates')
    torch.testing.assert_close(phase_scramble(x, torch.Generator().manual_seed(0)), s)
    # S copies of each tile from one transform are the draws of the tiles repeated S times
    many = phase_scramble(x[:4, 0], torch.Generator().manual_seed(1), dtype=torch.float64, copies=5)  # (4, 5, H, W)
    repeated = phase_scramble(x[:4, 0, None].expand(-1, 5, -1, -1), torch.Generator().manual_seed(1),
                              dtype=torch.float64)
    assert many.shape == (4, 5, 32, 32)
    torch.testing.assert_close(many, repeated, atol=1e-12, rtol=0)
    centre = lambda t: (t - t.mean((2, 3), keepdim=True)).flatten().numpy()  # noqa: E731
    r = np.corrcoef(centre(x), centre(s))[0, 1]
    assert abs(r) < 0.1


def test_smooth_noise_has_the_asked_spread_and_correlation_length():
    s = smooth_noise(64, 32, torch.Generator().manual_seed(0), std=0.4)
    assert s.shape == (64, 1, 32, 32)
    torch.testing.assert_close(s.double().std((2, 3)), torch.full((64, 1), 0.4, dtype=torch.float64), atol=1e-5,
                               rtol=0)
    # a Gaussian filter of σ = 1 px: neighbouring pixels correlate by exp(−1/4) ≈ 0.78, pixels 4 apart hardly
    x = s[:, 0].double()
    lag = lambda d: float((x * torch.roll(x, d, dims=2)).mean() / x.pow(2).mean())  # noqa: E731
    assert lag(1) == pytest.approx(math.exp(-0.25), abs=0.05) and abs(lag(4)) < 0.05


def test_craterless_sets_match_the_held_out_tiles_in_number_and_spread():
    x, _ = load_mars_craters(split="heldout", size=32)
    sets = craterless_sets(x)
    assert list(sets) == list(CRATERLESS)
    for v in sets.values():
        assert v.shape == x.shape
    assert float(sets[CRATERLESS[1]].std((2, 3)).mean()) == pytest.approx(float(x.std((2, 3)).mean()), rel=1e-3)


def test_realism_validation_fails_a_texture_scorer_and_passes_a_crater_detector():
    """A scorer that reads only texture (the tile's contrast) calls the phase-scrambled tiles real, as it does the
    real ones, so it fails; one that calls a tile real where the template detector finds a crater passes."""
    from evaluation.run import REALISM_GOAL, realism_validation
    from reward.templates import calibrated_matcher

    ho, _ = load_mars_craters(split="heldout", size=32)  # (131, 1, 32, 32)
    sets = craterless_sets(ho)
    contrast = ho.std(dim=(-2, -1)).median()
    texture = realism_validation(lambda x: x.std(dim=(-3, -2, -1)) - 0.8 * contrast, ho, sets)
    assert texture["sets"]["real held-out"]["called_real"] > 0.8
    assert texture["sets"]["phase-scrambled held-out"]["called_real"] > 0.8 and not texture["met"]

    train, _ = load_mars_craters(split="train", size=32)
    matcher, _ = calibrated_matcher(train)
    detector = realism_validation(lambda x: matcher.detect(x).found.double() * 2 - 1, ho, sets)
    assert detector["met"] and detector["goal"] == REALISM_GOAL
    assert detector["sets"]["real held-out"]["called_real"] > 0.6


def test_texture_check_calls_a_gain_shared_with_the_texture_row_texture():
    from evaluation.run import BASE, TEXTURE, texture_check

    def stat(v: float) -> dict:
        return {"mean": v, "std": 0.0, "values": [v]}

    def row(cov: float, kid: float) -> dict:
        return {"random_cnn": {"coverage": stat(cov), "kid_mean": stat(kid)}}

    # the texture row beats the base on random-CNN coverage and on the coverage of large craters there
    report = {"models": {BASE: row(0.7, 1.0), TEXTURE: row(0.8, 2.0), "tex": row(0.75, 1.5), "crater": row(0.75, 0.5)},
              "sizes": {"instruments": [], "models": {
                  BASE: {"coverage_ge100": {"random_cnn": stat(0.70)}},
                  TEXTURE: {"coverage_ge100": {"random_cnn": stat(0.78)}},
                  "tex": {"coverage_ge100": {"random_cnn": stat(0.74)}},
                  "crater": {"coverage_ge100": {"random_cnn": stat(0.65)}}}}}
    check = texture_check(report)
    assert check["tex"]["wins"] == ["random_cnn/coverage", "random_cnn/coverage_ge100"]
    assert check["tex"]["own"] == [] and check["tex"]["texture_only"]
    assert check["tex"]["behind_texture"] == ["random_cnn/coverage", "random_cnn/coverage_ge100"]
    # a KID gain the texture row does not have is the model's own
    assert check["crater"]["own"] == ["random_cnn/kid_mean"] and not check["crater"]["texture_only"]


def test_quadrant_shuffle_moves_whole_quadrants_and_breaks_centred_craters():
    from data.surrogates import quadrant_shuffle

    x, _ = load_mars_craters(split="heldout", size=32)
    s = quadrant_shuffle(x, torch.Generator().manual_seed(0))
    assert s.shape == x.shape and s.dtype == x.dtype
    # every output quadrant is one input quadrant of the same tile, turned by a multiple of 90°
    quads = lambda t: [t[:, :16, :16], t[:, :16, 16:], t[:, 16:, :16], t[:, 16:, 16:]]
    for i in range(0, len(x), 13):
        src = [torch.rot90(q, r, dims=(-2, -1)) for q in quads(x[i]) for r in range(4)]
        used = [next(k // 4 for k, c in enumerate(src) if torch.equal(c, q)) for q in quads(s[i])]
        assert sorted(used) == [0, 1, 2, 3]
    # not the identity: most tiles change
    assert (s != x).flatten(1).any(1).float().mean() > 0.9
    with pytest.raises(ValueError, match="even size"):
        quadrant_shuffle(torch.zeros(2, 1, 31, 31), torch.Generator())
