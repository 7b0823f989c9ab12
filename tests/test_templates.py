"""Crater size by template matching (reward/templates.py) and the `size` reward component: the NCC, the
parabolic refinement and the closed-form null variance against brute force, procedural craters of known diameter
and sun direction recovered, texture called no crater, and the size component's credit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from data.datasets import load_mars_craters
from data.procedural import CraterFactors, render_crater
from data.surrogates import phase_scramble
from reward.metrics import mmd2_unbiased_loo
from basics import CraterdiffError
from reward.templates import (LOG10_STEP, NO_CRATER_LOG10, TemplateMatcher, calibrate_light, matched_z, ncc, parabolic_offset,
                              render_templates, template_diameters, whitening)


def _crater(d: float, *, seed: int, az: float = 50.0, el: float = 65.0, **kw) -> torch.Tensor:
    """(1, 1, 32, 32) in [-1, 1]: a procedural crater of diameter d (fraction of the tile)."""
    f = CraterFactors(diameter=d, light_azimuth_deg=az, light_elevation_deg=el, **kw)
    return torch.from_numpy(render_crater(f, size=32, seed=seed) * 2 - 1)[None, None]


def test_ncc_is_the_pearson_correlation_of_pixels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 12, 12, generator=g) * 2 - 1
    t = torch.rand(3, 12, 12, generator=g, dtype=torch.float64)
    t_std = (t - t.mean((1, 2), keepdim=True)) / t.std((1, 2), unbiased=False, keepdim=True)
    rho = ncc(x, t_std)
    for i in range(5):
        for k in range(3):
            expected = np.corrcoef(x[i, 0].flatten().numpy(), t[k].flatten().numpy())[0, 1]
            assert rho[i, k].item() == pytest.approx(expected, abs=1e-10)
    # RGB is averaged over channels first; a flat tile correlates with nothing
    assert torch.allclose(ncc(x.expand(-1, 3, -1, -1), t_std), rho)
    assert torch.equal(ncc(torch.zeros(1, 1, 12, 12), t_std), torch.zeros(1, 3, dtype=torch.float64))


def test_parabolic_offset_finds_the_vertex():
    # y = -(u - c)^2 sampled at u = -1, 0, 1 has its vertex at c
    for c in (-0.4, -0.1, 0.0, 0.25, 0.45):
        y = [-((u - c) ** 2) for u in (-1.0, 0.0, 1.0)]
        got = parabolic_offset(*(torch.tensor([v], dtype=torch.float64) for v in y))
        assert got.item() == pytest.approx(c, abs=1e-12)
    flat = torch.tensor([1.0], dtype=torch.float64)
    assert parabolic_offset(flat, flat, flat).item() == 0.0
    # a tie of the peak with its left neighbour puts the vertex half-way between them
    assert parabolic_offset(*(torch.tensor([v], dtype=torch.float64) for v in (1.0, 1.0, 0.0))).item() == -0.5


def test_procedural_craters_of_known_diameter_are_recovered():
    """Noisy procedural craters of other depths and rims than the templates: the log diameter is
    recovered within 0.06 decades (×1.15), and sizes rank almost perfectly."""
    rng = np.random.default_rng(0)
    d_true = np.geomspace(0.14, 0.75, 24)
    x = torch.cat([_crater(float(d), seed=i, depth=float(rng.uniform(0.08, 0.2)),
                           rim_height=float(rng.uniform(0.02, 0.05)), noise=0.002) for i, d in enumerate(d_true)])
    det = TemplateMatcher(threshold=3.0).detect(x)
    assert det.found.all(), det.score
    assert np.abs(det.log10_fraction.numpy() - np.log10(d_true)).max() < 0.06
    grid = template_diameters()
    on_grid = TemplateMatcher(threshold=3.0).detect(
        _crater(float(grid[20]), seed=0, noise=0.0, contrast=0.5))
    # a template itself is found within one step of its own diameter (z, not ρ, is maximised: the null variance
    # differs between neighbouring templates)
    assert on_grid.log10_fraction.item() == pytest.approx(np.log10(grid[20]), abs=LOG10_STEP)
    with pytest.raises(ValueError, match="threshold"):
        TemplateMatcher().detect(x)


def test_null_variance_is_that_of_phase_scrambled_copies_by_monte_carlo():
    """z's denominator, Σ_f w_f² |X_f|² |T_f|², is the variance of the whitened matched filter over the tile's
    phase-scrambled copies (which keep |X| and hence w)."""
    tile = torch.from_numpy(render_crater(CraterFactors(diameter=0.4, noise=0.01), size=16, seed=3) * 2 - 1)[None, None]
    t = torch.fft.fft2(render_templates(16)[:, ::12])                                  # (V, 4, 16, 16)
    copies = phase_scramble(tile.expand(4000, -1, -1, -1).contiguous(), torch.Generator().manual_seed(0))
    x = copies.double()[:, 0]
    x = (x - x.mean((1, 2), keepdim=True)) / x.std((1, 2), unbiased=False, keepdim=True)
    spec = torch.fft.fft2(x)
    m = torch.einsum("nij,vkij->nvk", spec * whitening(spec.abs() ** 2), t.conj()).real  # (4000, V, 4)
    z = matched_z(copies, t)
    # the copies share the tile's amplitude spectrum, so all have the same denominator sqrt(Var) = m / z; over the
    # copies z has mean 0 and standard deviation 1 (within about 4 standard errors of 4000 draws)
    denominators = m / z
    torch.testing.assert_close(denominators, denominators[:1].expand_as(denominators), rtol=1e-6, atol=0)
    np.testing.assert_allclose(z.std(0).numpy(), 1.0, atol=0.05)
    assert float(z.mean(0).abs().max()) < 0.07


def test_texture_is_called_no_crater():
    """Phase-scrambled Mars tiles: calibrated on the train tiles, the detector finds a crater in at most a few
    percent of them, and never one in a flat tile; the reward's sizes give those tiles the no-crater atom."""
    from reward.artifact import detected_log_sizes
    from reward.templates import calibrated_matcher

    tr, _ = load_mars_craters(split="train", size=32)
    ho, _ = load_mars_craters(split="heldout", size=32)
    matcher, _ = calibrated_matcher(tr)
    assert 2.5 < matcher.threshold < 4.5
    scrambled = matcher.detect(phase_scramble(ho, torch.Generator().manual_seed(5)))
    assert scrambled.found.double().mean() <= 0.05
    assert matcher.detect(ho).found.double().mean() >= 0.7
    s = detected_log_sizes(matcher, torch.cat([ho[:8], torch.zeros(2, 1, 32, 32)]))
    assert (s[8:] == NO_CRATER_LOG10).all() and torch.isfinite(s).all()


def test_calibrate_light_recovers_the_sun_direction():
    x = torch.cat([_crater(float(d), seed=i, az=120.0, el=35.0) for i, d in enumerate((0.25, 0.4, 0.55))])
    az, el, peak = calibrate_light(x)
    assert (az, el) == (120.0, 35.0) and peak > 0.9


def test_templates_are_standardised_and_ordered_by_size():
    t = render_templates(32)
    assert t.shape == (4, 48, 32, 32)
    torch.testing.assert_close(t.mean((2, 3)), torch.zeros(4, 48, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(t.pow(2).mean((2, 3)), torch.ones(4, 48, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("detector", ["templates", "arcs"])
def test_size_component_credits_the_sizes_the_batch_lacks(tmp_path, detector):
    """In a batch of small craters against a reference of all sizes, the few large craters carry the
    highest `size` credit, and the component is the 1-d LOO MMD of the log sizes, by either detector."""
    from reward.artifact import build_reward_model, detected_log_sizes, load_artifact, save_artifact
    from reward.rims import ARCS, RimDetector
    import reward
    from config import load_config
    from .conftest import ROOT

    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["reward.features.name=pixels", "reward.realism.enabled=false",
                                                         "reward.weights.size=1.0", f"reward.size_detector={detector}"])
    ref = torch.cat([_crater(float(d), seed=i) for i, d in enumerate(np.geomspace(0.15, 0.75, 40))])
    model = build_reward_model(cfg, reference_images=ref, fake_images=None)
    batch = torch.cat([_crater(0.17, seed=100 + i) for i in range(12)] + [_crater(0.7, seed=200 + i) for i in range(2)])
    out = model(batch)
    s = model.sizes(batch)
    if detector == "arcs":  # the rim test with κ = 1 on both sides, its reference bandwidth by the median heuristic
        torch.testing.assert_close(s, detected_log_sizes(RimDetector(**ARCS), batch))
        torch.testing.assert_close(model.size_reference, detected_log_sizes(RimDetector(**ARCS), ref))
        assert model.size_bandwidth == pytest.approx(max(float(torch.pdist(model.size_reference[:, None]).median()),
                                                         float(np.diff(np.log10(template_diameters()))[0])))
    expected = mmd2_unbiased_loo(s[:, None], model.size_reference[:, None], bandwidth=model.size_bandwidth)
    torch.testing.assert_close(out.components["size"], expected.rewards)
    assert out.values["size"] == pytest.approx(float(expected.value))
    assert out.components["size"][12:].min() > out.components["size"][:12].max()
    # saved and loaded exactly, with the calibrated sun direction
    loaded = reward.load(save_artifact(model, tmp_path / "reward"))
    assert (loaded.sizer.azimuth_deg, loaded.sizer.elevation_deg) == (model.sizer.azimuth_deg,
                                                                     model.sizer.elevation_deg)
    assert torch.equal(loaded(batch).components["size"], out.components["size"])
    # one artifact serves both detectors; one without the arcs sizes is refused for arcs in one line
    other = "templates" if detector == "arcs" else "arcs"
    switched = load_artifact(tmp_path / "reward", weights={"size": 1.0}, size_detector=other)
    assert switched.size_detector == other and not torch.equal(switched.size_reference, model.size_reference)
    (tmp_path / "reward" / "reference_sizes_arcs.npy").unlink()
    meta = yaml.safe_load((tmp_path / "reward" / "reward.yaml").read_text())
    del meta["sha256"]["reference_sizes_arcs.npy"]
    (tmp_path / "reward" / "reward.yaml").write_text(yaml.safe_dump(meta))
    assert load_artifact(tmp_path / "reward", size_detector="templates").size_detector == "templates"
    with pytest.raises(CraterdiffError, match="no reference sizes by arcs; rebuild it"):
        load_artifact(tmp_path / "reward", size_detector="arcs")


def test_references_of_one_crater_size_still_build():
    """All reference craters of one diameter: the size bandwidth falls back to one template step."""
    from reward.artifact import build_reward_model
    from config import load_config
    from .conftest import ROOT

    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["reward.features.name=pixels", "reward.realism.enabled=false"])
    ref = torch.cat([_crater(0.4, seed=i) for i in range(12)])
    model = build_reward_model(cfg, reference_images=ref, fake_images=None)
    assert model.size_bandwidth == pytest.approx(float(np.diff(np.log10(template_diameters()))[0]))
    assert torch.isfinite(model(torch.cat([_crater(0.2, seed=50 + i) for i in range(8)])).components["size"]).all()


def test_calibration_of_large_tiles_works_at_a_smaller_size():
    big = torch.nn.functional.interpolate(torch.cat([_crater(d, seed=i, az=120.0, el=35.0)
                                                     for i, d in enumerate((0.3, 0.5))]), size=(256, 256),
                                          mode="bilinear", align_corners=False)
    az, el, _ = calibrate_light(big)
    assert (az, el) == (120.0, 35.0)
