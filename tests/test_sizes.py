"""Crater sizes (evaluation/sizes.py): the radial-profile features and their symmetries, the estimator
validated on the held-out split, procedural craters of known diameter ranked by size, and every
size-frequency figure against brute force or a hand computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from data.datasets import load_mars_craters
from data.procedural import CraterFactors, render_crater
from evaluation.metrics import prdc
from evaluation.sizes import (HIST_EDGES_LOG10, cumulative_counts, fit_size_estimator, kl_histograms,
                              load_size_estimator, save_size_estimator,
                              share_large, size_histogram, subset_coverage, wasserstein_log10)
from reward.profiles import RINGS, radial_profile_features, ring_index
from utils import CraterdiffError


@pytest.fixture(scope="module")
def mars():
    tr, rt = load_mars_craters(split="train", size=32)
    ho, rh = load_mars_craters(split="heldout", size=32)
    d_tr = np.array([float(r["diameter_km"]) for r in rt])
    d_ho = np.array([float(r["diameter_km"]) for r in rh])
    return tr, d_tr, ho, d_ho


@pytest.fixture(scope="module")
def estimator(mars):
    return fit_size_estimator(*mars)


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


def test_estimator_validates_on_held_out_craters(mars, estimator):
    # fitted on the 130 train craters only; on the 131 held-out ones it explains most of the variance
    # of log10 D (a constant predictor scores R² = 0, MAE = the spread of log10 D)
    _, _, ho, d_ho = mars
    assert estimator.n_train == 130 and estimator.n_heldout == 131
    assert estimator.heldout_r2 > 0.5, estimator.heldout_r2
    spread = np.abs(np.log10(d_ho) - np.log10(d_ho).mean()).mean()
    assert estimator.heldout_mae < 0.7 * spread
    assert (estimator.heldout_r2, estimator.heldout_mae) == estimator.validate(ho, d_ho)


def test_procedural_craters_of_known_diameter_rank_by_size(estimator):
    # rendered craters with rim-to-rim diameter D = f · 320 km (the tile width), f over the Mars set's range
    fractions = np.linspace(0.18, 0.55, 8)
    tiles = torch.stack([torch.from_numpy(render_crater(CraterFactors(diameter=float(f)), size=32, seed=i))
                         for i, f in enumerate(fractions)])[:, None] * 2 - 1
    pred = estimator.predict_km(tiles)
    assert spearmanr(fractions, pred).statistic >= 0.95, pred


def test_save_load_gives_identical_sizes_and_refuses_a_corrupted_file(tmp_path, mars, estimator):
    path = save_size_estimator(estimator, tmp_path / "size")
    loaded = load_size_estimator(path)
    np.testing.assert_array_equal(loaded.predict_km(mars[2]), estimator.predict_km(mars[2]))
    assert loaded.heldout_r2 == estimator.heldout_r2 and loaded.train_sha256 == estimator.train_sha256
    data = bytearray((path / "size_estimator.npz").read_bytes())
    data[-10] ^= 0xFF
    (path / "size_estimator.npz").write_bytes(bytes(data))
    with pytest.raises(CraterdiffError, match="checksum mismatch"):
        load_size_estimator(path)


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


def test_large_real_craters_score_a_larger_share_and_a_smaller_distance(mars, estimator):
    # two "generated" sets made of real held-out craters: the largest third and the smallest third
    _, _, ho, d_ho = mars
    order = np.argsort(d_ho)
    small, large = ho[order[:40]], ho[order[-40:]]
    ref = estimator.predict_km(ho)
    d_small, d_large = estimator.predict_km(small), estimator.predict_km(large)
    assert share_large(d_large) > share_large(d_small) + 0.3
    mixed = ho[order[::3]]  # every third crater by size: the held-out SFD
    d_mixed = estimator.predict_km(mixed)
    assert wasserstein_log10(d_mixed, ref) < wasserstein_log10(d_small, ref)
    assert wasserstein_log10(d_mixed, ref) < wasserstein_log10(d_large, ref)
    assert kl_histograms(ref, d_mixed) < kl_histograms(ref, d_small)


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
    from utils import EvalConfig

    tr, d_tr, ho, d_ho = mars
    keep = d_ho >= np.median(d_ho)  # the real folder: the larger half of the held-out craters
    _tile_folder(tmp_path / "real", ho[torch.from_numpy(keep)], d_ho[keep])
    _tile_folder(tmp_path / "large", tr[torch.from_numpy(d_tr >= 100)])
    _tile_folder(tmp_path / "small", tr[torch.from_numpy(d_tr < 70)])
    ev = EvalConfig(tsne=False, kid_subsets=5)
    reports = {name: evaluate_folders(tmp_path / "real", tmp_path / name, tmp_path / f"eval_{name}",
                                      features=["pixels"], ev=ev) for name in ("large", "small")}
    sizes = {name: r["sizes"]["models"]["generated"] for name, r in reports.items()}
    assert sizes["large"]["share_ge100"]["mean"] > sizes["small"]["share_ge100"]["mean"] + 0.3
    assert sizes["large"]["w1_log10"]["mean"] < sizes["small"]["w1_log10"]["mean"]
    assert sizes["large"]["kl_hist"]["mean"] < sizes["small"]["kl_hist"]["mean"]
    r = reports["large"]
    assert r["sizes"]["real_folder_validation"]["n"] == int(keep.sum())
    assert "coverage_ge100" in sizes["large"] and "pixels" in sizes["large"]["coverage_ge100"]
    saved = json.loads((tmp_path / "eval_large" / "report.json").read_text())
    assert saved["sizes"]["heldout"]["share_ge100_true"] == pytest.approx(share_large(d_ho[keep]))
    assert "## Crater sizes" in (tmp_path / "eval_large" / "report.md").read_text()


def test_folder_mode_says_in_one_line_that_it_skipped_the_sizes(tmp_path, mars, capsys):
    from evaluation.run import evaluate_folders
    from utils import EvalConfig

    _tile_folder(tmp_path / "real", mars[2][:20])
    _tile_folder(tmp_path / "gen", mars[0][:20])
    r = evaluate_folders(tmp_path / "real", tmp_path / "gen", tmp_path / "eval", features=["pixels"],
                         ev=EvalConfig(tsne=False, kid_subsets=5))
    assert "sizes" not in r and "has no metadata.csv" in r["sizes_skipped"]
    captured = capsys.readouterr()
    lines = [ln for ln in (captured.out + captured.err).splitlines() if "size figures skipped" in ln]
    assert len(lines) == 1 and "metadata.csv" in lines[0]
    assert any("size figures skipped" in c.lower() for c in r["caveats"])
