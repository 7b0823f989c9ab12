"""Crater sizes (evaluation/sizes.py, reward/rims.py): the radial-profile features and their symmetries, both
detectors validated on the held-out split and on craterless surrogates, procedural craters of known diameter
ranked by size, and every size-frequency figure against brute force or a hand computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from data.datasets import load_mars_craters
from data.procedural import CraterFactors, render_crater
from data.surrogates import craterless_sets
from evaluation.metrics import prdc
from reward.rims import RimDetector, arc_sectors, opposite_coherence, ring_coherence, ring_weights, sector_masks
from evaluation.sizes import (HIST_EDGES_LOG10, R_BIN_EDGES_KM, VALIDATION_GOALS, build_instruments,
                              cumulative_counts, kl_histograms, r_plot, share_large, size_figures, size_histogram,
                              share_called, subset_coverage, validate_instrument, wasserstein_log10)
from reward.profiles import RINGS, radial_profile_features, ring_index


@pytest.fixture(scope="module")
def mars():
    tr, rt = load_mars_craters(split="train", size=32)
    ho, rh = load_mars_craters(split="heldout", size=32)
    d_tr = np.array([float(r["diameter_km"]) for r in rt])
    d_ho = np.array([float(r["diameter_km"]) for r in rh])
    return tr, d_tr, ho, d_ho


@pytest.fixture(scope="module")
def instruments(mars):
    return build_instruments(mars[0], mars[1])


def test_ring_index_against_brute_force():
    size = 9
    idx = ring_index(size, rings=4)
    c = (size - 1) / 2
    for i in range(size):
        for j in range(size):
            r = math.hypot(i - c, j - c)
            assert idx[i, j] == min(4, int(r / (size / 2) * 4)), (i, j)


def test_features_are_invariant_to_the_tiles_rotations_and_flips(mars):
    x = mars[0][:6]
    phi = radial_profile_features(x)
    assert phi.shape == (6, 3 * (RINGS + 1))
    for k in range(4):
        for flip in (False, True):
            y = torch.rot90(x, k, (2, 3))
            y = y.flip(3) if flip else y
            torch.testing.assert_close(radial_profile_features(y), phi, rtol=1e-10, atol=1e-10)
    # but not to a change of size: a crater twice as wide has another profile
    assert not torch.allclose(radial_profile_features(x[:, :, 8:24, 8:24]), phi, atol=1e-3)


@pytest.mark.parametrize("name", ["rims", "arcs", "templates"])
def test_each_instrument_meets_its_validation_goals_on_real_and_craterless_tiles(mars, instruments, name):
    """On the held-out tiles the detected craters' large shares match the catalogue's and D ranks with it; on
    their phase-scrambled copies and on smooth noise (same texture, no crater) few large craters are called."""
    _, _, ho, d_ho = mars
    v = validate_instrument(instruments[name], ho, d_ho, craterless_sets(ho))
    real = v["sets"]["real held-out"]
    assert real["detect_rate"] > (0.5 if name == "arcs" else 0.6), real
    assert real["spearman"] >= VALIDATION_GOALS["real_spearman"], real
    assert abs(real["share_ge100_detected"] - real["catalogue_share_ge100"]) <= 0.05, real
    for craterless in ("phase-scrambled held-out", "smooth noise"):
        row = v["sets"][craterless]
        assert row["share_ge100"] <= 0.05 and row["share_ge150"] <= 0.02 and row["detect_rate"] <= 0.05, row
    assert v["met"], v["goals"]


def test_a_craters_pieces_are_no_crater_to_the_arcs_and_templates_but_are_to_the_whole_ring(mars, instruments):
    """The held-out tiles with their quadrants shuffled keep every piece of each rim but no whole crater: the
    opposite-arcs detector and the template matcher call few of them large, the whole-ring detector more than the
    goal allows (the reports' validation tables say so)."""
    from data.surrogates import BROKEN, broken_rims

    _, _, ho, _ = mars
    pieces = broken_rims(ho)[BROKEN]
    called = {name: share_called(*inst.detect_km(pieces), 100.0) for name, inst in instruments.items()}
    goal = VALIDATION_GOALS["craterless_share_ge100"]
    assert called["arcs"] <= goal and called["templates"] <= goal and called["rims"] > goal, called


@pytest.mark.parametrize("name", ["rims", "arcs", "templates"])
def test_procedural_craters_of_known_diameter_rank_by_size_and_a_flat_tile_has_none(instruments, name):
    # rendered craters with rim-to-rim diameter D = f · 320 km (the tile width), f over the Mars set's range, under
    # the Mars tiles' sun for the template matcher (calibrated to it) and another sun for the rim detector (which
    # has none)
    fractions = np.linspace(0.18, 0.55, 8)
    sun = dict(light_azimuth_deg=50.0, light_elevation_deg=65.0) if name == "templates" else {}
    tiles = torch.stack([torch.from_numpy(render_crater(CraterFactors(diameter=float(f), **sun), size=32, seed=i))
                         for i, f in enumerate(fractions)])[:, None] * 2 - 1
    found, d = instruments[name].detect_km(tiles)
    assert found.all() and spearmanr(fractions, d).statistic >= 0.95, d
    assert np.abs(np.log10(d / (fractions * 320))).max() < 0.15, d / (fractions * 320)
    flat, _ = instruments[name].detect_km(torch.zeros(2, 1, 32, 32))
    assert not flat.any()


def test_ring_coherence_is_radial_minus_tangential_gradient_energy_by_brute_force():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 9, generator=g, dtype=torch.float64)
    w = ring_weights(9, np.array([0.2, 0.35]))
    got = ring_coherence(x, w)
    c = 4.0
    for n in range(2):
        gy, gx = np.gradient(x[n].numpy())
        num = np.zeros(2)
        for i in range(9):
            for j in range(9):
                r = math.hypot(i - c, j - c)
                ur = ((i - c) / r, (j - c) / r) if r > 0 else (0.0, 0.0)
                g_r = gy[i, j] * ur[0] + gx[i, j] * ur[1]
                g_t2 = gy[i, j] ** 2 + gx[i, j] ** 2 - g_r ** 2
                num += w[:, i, j].numpy() * (g_r ** 2 - g_t2)
        np.testing.assert_allclose(got[n].numpy(), num / (gy ** 2 + gx ** 2).mean(), rtol=1e-10)
    # a radially symmetric bump's gradient is radial: on every ring c(R) is nearly its whole gradient energy
    yy, xx = np.mgrid[0:31, 0:31] - 15.0
    bump = torch.from_numpy(np.exp(-(yy ** 2 + xx ** 2) / (2 * 5.0 ** 2)))[None]
    w = ring_weights(31)
    gy, gx = torch.gradient(bump, dim=(-2, -1))
    energy = torch.einsum("nij,rij->nr", gy ** 2 + gx ** 2, w) / (gy ** 2 + gx ** 2).mean()
    assert (ring_coherence(bump, w) > 0.9 * energy).all()
    with pytest.raises(ValueError, match="surrogates"):
        RimDetector(alpha=0.001, surrogates=99)


def test_opposite_coherence_is_the_weaker_of_two_opposite_sectors_and_ignores_a_lone_arc():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 11, 11, generator=g, dtype=torch.float64)
    w, masks = ring_weights(11, np.array([0.25, 0.4])), sector_masks(11, 8)
    assert torch.equal(masks.sum(0), torch.ones(11, 11))  # every pixel in one sector
    energy = float(torch.stack(torch.gradient(x[0])).pow(2).sum(0).mean())
    per = []  # c_j(R) by brute force: the ring coherence with the annulus cut to sector j and renormalised
    for j in range(8):
        wj = w * masks[j]
        wj = wj / wj.sum(dim=(1, 2), keepdim=True)
        per.append(ring_coherence(x, wj)[0] * energy / float(torch.stack(torch.gradient(x[0])).pow(2).sum(0).mean()))
    per = torch.stack(per, 1)  # (n_R, 8)
    expected = torch.minimum(per[:, :4], per[:, 4:]).amax(1)
    torch.testing.assert_close(opposite_coherence(x, w, 8)[0], expected)
    # a crater's rim (a dark disk's edge) scores on both statistics; the same edge cut to one side of the centre (an
    # arc, as a broken rim is) keeps a third of its ring coherence but loses the opposite-sides one
    yy, xx = np.mgrid[0:31, 0:31] - 15.0
    disk = np.tanh((np.hypot(yy, xx) - 9.0) / 1.5)
    arc = np.where(xx > 0.0, disk, 1.0)  # the rim on the right half only
    full, half = (torch.from_numpy(a)[None] for a in (disk, arc))
    w = ring_weights(31)
    k = int(np.argmax(ring_coherence(full, w)[0].numpy()))
    assert ring_coherence(half, w)[0, k] > 0.3 * ring_coherence(full, w)[0, k]
    assert opposite_coherence(full, w, 8)[0, k] > 0.5 * ring_coherence(full, w)[0, k]
    assert opposite_coherence(half, w, 8)[0, k] < 0.05 * opposite_coherence(full, w, 8)[0, k]
    with pytest.raises(ValueError, match="unknown rim statistic 'rings'"):
        RimDetector(statistic="rings")
    with pytest.raises(ValueError, match="sectors must be an even number"):
        RimDetector(statistic="opposite", sectors=5)


def test_opposite_coherence_on_arcs_of_several_sectors_matches_brute_force_and_still_ignores_a_lone_arc():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 13, 13, generator=g, dtype=torch.float64)
    w, masks = ring_weights(13, np.array([0.2, 0.3, 0.42])), sector_masks(13, 16)
    assert arc_sectors(16, 5)[0].tolist() == [14, 15, 0, 1, 2]  # centred on sector 0, wrapping round
    per = []  # c_j(R) by brute force: the annulus cut to the five sectors about sector j and renormalised
    for j in range(16):
        cut = w * sum(masks[(j + d) % 16] for d in range(-2, 3))
        per.append(ring_coherence(x, cut / cut.sum(dim=(1, 2), keepdim=True)))
    per = torch.stack(per, -1)  # (2, n_R, 16)
    expected = torch.minimum(per[..., :8], per[..., 8:]).amax(-1)
    torch.testing.assert_close(opposite_coherence(x, w, 16, 5), expected)
    torch.testing.assert_close(opposite_coherence(x, w, 8, 1), opposite_coherence(x, w, 8))
    yy, xx = np.mgrid[0:31, 0:31] - 15.0
    disk = np.tanh((np.hypot(yy, xx) - 9.0) / 1.5)
    quarter = np.where((xx > 0.0) & (yy > 0.0), disk, 1.0)  # a quarter of the rim: a piece the arcs cannot span
    full, piece = (torch.from_numpy(a)[None] for a in (disk, quarter))
    w = ring_weights(31)
    k = int(np.argmax(ring_coherence(full, w)[0].numpy()))
    assert opposite_coherence(full, w, 16, 5)[0, k] > 0.5 * ring_coherence(full, w)[0, k]
    assert opposite_coherence(piece, w, 16, 5)[0, k] < 0.05 * opposite_coherence(full, w, 16, 5)[0, k]
    with pytest.raises(ValueError, match="arc must be 1 to sectors / 2 = 8"):
        RimDetector(statistic="opposite", sectors=16, arc=9)


def test_r_plot_and_size_figures_against_hand_computations():
    d = np.array([40.0, 50.0, 50.0, 100.0, np.nan])
    mid, r, sigma, counts = r_plot(d, n_tiles=5)
    e = np.asarray(R_BIN_EDGES_KM)
    np.testing.assert_array_equal(counts[:4], [1, 2, 0, 1])  # [32, 45), [45, 64), [64, 90), [90, 128)
    assert mid[1] == pytest.approx(math.sqrt(e[1] * e[2]))
    assert r[1] == pytest.approx(mid[1] ** 3 * 2 / (5 * (e[2] - e[1])))
    assert sigma[1] == pytest.approx(r[1] / math.sqrt(2)) and math.isnan(r[2]) and math.isnan(sigma[2])
    # undetected tiles count as "no crater" in the shares and are left out of W1
    found = np.isfinite(d)
    ref = np.array([45.0, 120.0, 160.0])
    figs = size_figures(found, d, np.ones(3, bool), ref)
    assert figs["detect_rate"] == 0.8 and figs["share_ge100"] == 0.2 and figs["share_ge150"] == 0.0
    assert figs["w1_log10"] == pytest.approx(wasserstein_log10(d[found], ref))
    nothing = size_figures(np.zeros(3, bool), np.full(3, np.nan), np.ones(3, bool), ref)
    assert nothing["share_ge100"] == 0.0 and math.isnan(nothing["w1_log10"])


def test_share_w1_kl_and_cumulative_counts_against_hand_computations():
    d = np.array([50.0, 100.0, 150.0, 80.0])
    assert share_large(d) == 0.5  # 100 counts as large
    # W1 of two equal-size samples = mean |sorted a − sorted b|
    ref = np.array([60.0, 90.0, 200.0, 120.0])
    brute = np.abs(np.sort(np.log10(d)) - np.sort(np.log10(ref))).mean()
    assert wasserstein_log10(d, ref) == pytest.approx(brute, rel=1e-12)
    assert wasserstein_log10(d, d) == 0.0
    # KL of the pseudocounted histograms, by hand on three bins
    edges = (math.log10(40), math.log10(80), math.log10(160), math.log10(320))
    np.testing.assert_array_equal(size_histogram(d, edges=edges), [1, 3, 0])  # 80 and 100 and 150 in bin 2
    p = np.array([1.5, 3.5, 0.5]) / 5.5
    q_counts = size_histogram(ref, edges=edges) + 0.5
    q = q_counts / q_counts.sum()
    assert kl_histograms(d, ref, edges=edges) == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-12)
    assert kl_histograms(d, d) == pytest.approx(0.0, abs=1e-15)
    # sizes beyond the edges count in the end bins
    assert size_histogram(np.array([10.0, 1000.0])).tolist() == [1] + [0] * 10 + [1]
    assert len(HIST_EDGES_LOG10) == 13
    # N(≥D), brute force
    sizes, counts = cumulative_counts(d)
    for s, c in zip(sizes, counts):
        assert c == (d >= s).sum()


def test_subset_coverage_against_brute_force_and_prdc():
    g = torch.Generator().manual_seed(0)
    real, gen = torch.randn(30, 4, generator=g), torch.randn(25, 4, generator=g) + 0.3
    subset = torch.zeros(30, dtype=torch.bool)
    subset[::3] = True
    d_rr = torch.cdist(real.double(), real.double())
    hits = []
    for i in torch.nonzero(subset).flatten().tolist():
        radius = d_rr[i].sort().values[5]  # 5th neighbour, the point itself at index 0
        hits.append(bool((torch.cdist(real[i:i + 1].double(), gen.double()) <= radius).any()))
    assert subset_coverage(real, gen, subset, k=5) == pytest.approx(sum(hits) / len(hits))
    everything = torch.ones(30, dtype=torch.bool)
    assert subset_coverage(real, gen, everything, k=5) == pytest.approx(prdc(real, gen)["coverage"])
    with pytest.raises(ValueError, match="empty"):
        subset_coverage(real, gen, torch.zeros(30, dtype=torch.bool))


@pytest.mark.parametrize("name", ["rims", "templates"])
def test_large_real_craters_score_a_larger_share_and_a_smaller_distance(mars, instruments, name):
    # two "generated" sets made of real held-out craters: the largest third and the smallest third
    _, _, ho, d_ho = mars
    order = np.argsort(d_ho)
    inst = instruments[name]
    ref = inst.detect_km(ho)
    small, large, mixed = (inst.detect_km(ho[order[sl]]) for sl in (slice(0, 40), slice(-40, None), slice(None, None, 3)))
    fig = {k: size_figures(*v, *ref) for k, v in (("small", small), ("large", large), ("mixed", mixed))}
    assert fig["large"]["share_ge100"] > fig["small"]["share_ge100"] + 0.3
    assert fig["mixed"]["w1_log10"] < fig["small"]["w1_log10"]  # every third crater by size: the held-out SFD
    assert fig["mixed"]["w1_log10"] < fig["large"]["w1_log10"]
    assert fig["mixed"]["kl_hist"] < fig["small"]["kl_hist"]


def _tile_folder(path, images, diameters=None):
    """Write tiles as PNG files (and a metadata.csv with their diameters, if given)."""
    from utils import save_images

    save_images(images, path)
    if diameters is not None:
        files = sorted(p.name for p in path.glob("*.png"))
        rows = ["file,diameter_km"] + [f"{f},{d}" for f, d in zip(files, diameters)]
        (path / "metadata.csv").write_text("\n".join(rows) + "\n")


def test_folder_mode_reports_sizes_when_the_real_folder_has_diameters(tmp_path, mars):
    import json

    from evaluation.run import evaluate_folders
    from config import EvalConfig

    tr, d_tr, ho, d_ho = mars
    keep = d_ho >= np.median(d_ho)  # the real folder: the larger half of the held-out craters
    _tile_folder(tmp_path / "real", ho[torch.from_numpy(keep)], d_ho[keep])
    _tile_folder(tmp_path / "large", tr[torch.from_numpy(d_tr >= 100)])
    _tile_folder(tmp_path / "small", tr[torch.from_numpy(d_tr < 70)])
    ev = EvalConfig(tsne=False, kid_subsets=5)
    reports = {name: evaluate_folders(tmp_path / "real", tmp_path / name, tmp_path / f"eval_{name}",
                                      features=["pixels"], ev=ev) for name in ("large", "small")}
    sizes = {name: r["sizes"]["models"]["generated"] for name, r in reports.items()}
    for inst in ("rims", "templates"):
        assert sizes["large"][f"share_ge100_{inst}"]["mean"] > sizes["small"][f"share_ge100_{inst}"]["mean"] + 0.3
        assert sizes["large"][f"w1_log10_{inst}"]["mean"] < sizes["small"][f"w1_log10_{inst}"]["mean"]
    r = reports["large"]
    # both instruments validated on the real folder's catalogue diameters and its craterless surrogates; the
    # texture-only row is the real folder phase-scrambled
    for inst in ("rims", "templates"):
        assert r["sizes"]["validation"][inst]["sets"]["real held-out"]["n"] == int(keep.sum())
        assert r["sizes"]["validation"][inst]["sets"]["smooth noise"]["share_ge100"] <= 0.05
        assert r["sizes"]["models"]["texture_only"][f"detect_rate_{inst}"]["mean"] <= 0.1
    assert "coverage_ge100" in sizes["large"] and "pixels" in sizes["large"]["coverage_ge100"]
    saved = json.loads((tmp_path / "eval_large" / "report.json").read_text())
    assert saved["sizes"]["heldout"]["share_ge100_true"] == pytest.approx(share_large(d_ho[keep]))
    md = (tmp_path / "eval_large" / "report.md").read_text()
    assert "## Crater sizes" in md and "## Crater-size instruments: validation" in md and "| texture_only |" in md


def test_folder_mode_says_in_one_line_that_it_skipped_the_sizes(tmp_path, mars, capsys):
    from evaluation.run import evaluate_folders
    from config import EvalConfig

    _tile_folder(tmp_path / "real", mars[2][:20])
    _tile_folder(tmp_path / "gen", mars[0][:20])
    r = evaluate_folders(tmp_path / "real", tmp_path / "gen", tmp_path / "eval", features=["pixels"],
                         ev=EvalConfig(tsne=False, kid_subsets=5))
    assert "sizes" not in r and "has no metadata.csv" in r["sizes_skipped"]
    captured = capsys.readouterr()
    lines = [ln for ln in (captured.out + captured.err).splitlines() if "size figures skipped" in ln]
    assert len(lines) == 1 and "metadata.csv" in lines[0]
    assert any("size figures skipped" in c.lower() for c in r["caveats"])
