"""The composite reward and the frozen reward artifact: build, save, load exactly, refuse bad files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import reward
from config import load_config
from reward.artifact import build_reward_model, check_reference, save_artifact
from reward.metrics import median_bandwidth
from reward.composite import composite_reward, zscore
from data.procedural import procedural_set
from basics import CraterdiffError

from .conftest import ROOT, run_script, script_error


def test_zscore_and_composite_against_hand_computation():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    z = zscore(r)
    expected = (r - 3.0) / torch.tensor(3.5).sqrt()  # population std of [1,2,3,6] = sqrt(3.5)
    torch.testing.assert_close(z, expected.double())
    assert torch.equal(zscore(torch.full((5,), 2.0)), torch.zeros(5, dtype=torch.float64))
    comps = {"a": r, "b": -r * 100, "c": torch.randn(4)}
    total = composite_reward(comps, {"a": 0.7, "b": 0.3, "c": 0.0})
    torch.testing.assert_close(total, 0.7 * z + 0.3 * (-z))
    with pytest.raises(KeyError, match="realism"):
        composite_reward(comps, {"realism": 1.0})
    with pytest.raises(ValueError, match="every reward weight is 0"):
        composite_reward(comps, {"a": 0.0})


def _cfg(*over):
    return load_config(ROOT / "configs" / "smoke.yaml",
                       ["reward.features.name=pixels", "reward.realism.epochs=2", "reward.weights.mmd=0.7",
                        "reward.weights.mi=0.3", "reward.weights.ot=1.0", "reward.weights.realism=0.5", *over])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = _cfg()
    real = procedural_set(40, size=32, channels=1, seed=0)
    fake = procedural_set(40, size=32, channels=1, seed=1, n_distinct=4)
    model = build_reward_model(cfg, reference_images=real, fake_images=fake)
    path = save_artifact(model, tmp_path_factory.mktemp("art") / "reward")
    return model, path


def test_save_load_gives_identical_rewards(built):
    model, path = built
    batch = procedural_set(16, size=32, channels=1, seed=7)
    rewards, components = model(batch)
    loaded = reward.load(path, expect_extractor="pixels")
    rewards2, components2 = loaded(batch)
    assert torch.equal(rewards, rewards2)
    assert set(components) == {"mmd", "mi", "knn_entropy", "fid", "ot", "coverage", "size", "realism"}
    for k in components:
        assert torch.equal(components[k], components2[k]), k
    assert rewards.shape == (16,) and torch.isfinite(rewards).all()
    assert loaded.bandwidth == model.bandwidth and loaded.weights == model.weights
    # a run directory holding reward/ loads too
    assert reward.load(path.parent).bandwidth == model.bandwidth


def test_diverse_batch_outscores_collapsed_batch(built):
    model, _ = built
    diverse = procedural_set(16, size=32, channels=1, seed=9)
    collapsed = procedural_set(16, size=32, channels=1, seed=9, n_distinct=1)
    d, c = model(diverse), model(collapsed)
    assert d.values["mmd"] < c.values["mmd"] and d.values["ot"] < c.values["ot"]
    assert d.values["mi"] > c.values["mi"]


def test_other_extractor_is_refused(built):
    _, path = built
    with pytest.raises(CraterdiffError, match="built with extractor 'pixels' but the config asks for 'efficientnet_lite0'"):
        reward.load(path, expect_extractor="efficientnet_lite0")


@pytest.mark.parametrize("victim", ["reference_features.npy", "reference_sizes.npy", "pca.npz", "realism.safetensors"])
def test_corrupted_or_missing_file_is_refused(built, tmp_path, victim):
    import shutil
    _, path = built
    copy = tmp_path / "reward"
    shutil.copytree(path, copy)
    data = (copy / victim).read_bytes()
    (copy / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CraterdiffError, match="corrupted"):
        reward.load(copy)
    (copy / victim).unlink()
    with pytest.raises(CraterdiffError, match="missing"):
        reward.load(copy)


def test_missing_artifact_and_garbled_yaml(tmp_path):
    with pytest.raises(CraterdiffError, match="no reward artifact"):
        reward.load(tmp_path)
    (tmp_path / "reward.yaml").write_text("format: [1\n")
    with pytest.raises(CraterdiffError, match="corrupted"):
        reward.load(tmp_path)


def test_realism_weight_without_scorer_is_refused():
    cfg = _cfg("reward.realism.enabled=false")
    with pytest.raises(CraterdiffError, match="realism"):
        build_reward_model(cfg, reference_images=procedural_set(12, size=32, channels=1), fake_images=None)


def test_train_reward_model_script_smoke(tmp_path, smoke_cfg):
    proc = run_script("scripts.train_reward_model", "--cfg", smoke_cfg, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for f in ("reward.yaml", "reference_features.npy", "reference_sizes.npy", "pca.npz", "realism.safetensors"):
        assert (tmp_path / "reward" / f).is_file(), f
    ref = np.load(tmp_path / "reward" / "reference_features.npy")
    assert ref.shape == (130, 1280)  # the train split, EfficientNet-Lite0 pooled features
    assert np.load(tmp_path / "reward" / "reference_sizes.npy").shape == (130,)
    model = reward.load(tmp_path / "reward", expect_extractor="efficientnet_lite0")
    assert model.info["realism"]["enabled"] and 0.0 <= model.info["realism"]["heldout_auc"] <= 1.0
    # a config asking for another extractor is refused with one line
    proc = run_script("scripts.train_reward_model", "--cfg", smoke_cfg, "--out", tmp_path / "x",
                      "--set", "reward.features.name=clip")
    script_error(proc, progress_bars=False)


def test_load_with_other_weights_reweights_the_same_components(built):
    """The ablation reuses one artifact: new weights change only the composite, not the components."""
    from reward.artifact import load_artifact

    _, path = built
    batch = procedural_set(16, size=32, channels=1, seed=7)
    saved = load_artifact(path)
    ot_only = load_artifact(path, weights={"mmd": 0.0, "mi": 0.0, "knn_entropy": 0.0, "fid": 0.0, "ot": 1.0,
                                           "realism": 0.0})
    a, b = saved(batch), ot_only(batch)
    for k in a.components:
        assert torch.equal(a.components[k], b.components[k]), k
    torch.testing.assert_close(b.rewards, zscore(b.components["ot"]))
    assert not torch.allclose(a.rewards, b.rewards)
    assert saved.weights["mmd"] == 0.7 and ot_only.weights["mmd"] == 0.0


def test_size_bandwidth_scale_narrows_the_size_kernel_on_load(built):
    """reward.size_bandwidth_scale multiplies the saved size bandwidth when the artifact is loaded: the size credit
    changes, the saved file does not."""
    from reward.artifact import load_artifact
    from reward.metrics import mmd2_unbiased_loo

    _, path = built
    saved, narrow = load_artifact(path), load_artifact(path, size_bandwidth_scale=0.25)
    assert narrow.size_bandwidth == pytest.approx(0.25 * saved.size_bandwidth)
    batch = procedural_set(16, size=32, channels=1, seed=7)
    sizes = narrow.sizes(batch)  # (16,)
    want = mmd2_unbiased_loo(sizes[:, None], narrow.size_reference[:, None], bandwidth=0.25 * saved.size_bandwidth)
    torch.testing.assert_close(narrow(batch).components["size"], want.rewards.double())
    assert not torch.allclose(saved(batch).components["size"], want.rewards.double())
    assert load_artifact(path).size_bandwidth == saved.size_bandwidth


def test_coverage_softness_is_saved_and_can_be_set_on_load(built):
    """The artifact keeps the coverage reward's ball edge it was built with (reward.coverage_softness); a value given
    on load replaces it, and a softer edge changes the credit."""
    from reward.artifact import load_artifact
    from reward.metrics import soft_coverage_loo

    model, path = built
    weights = {"coverage": 1.0}
    edge = _cfg().reward.coverage_softness
    saved, soft = load_artifact(path, weights=weights), load_artifact(path, weights=weights, coverage_softness=0.1)
    assert saved.coverage_softness == model.coverage_softness == edge != 0.1 and soft.coverage_softness == 0.1
    batch = procedural_set(16, size=32, channels=1, seed=7)
    feats = saved.features(batch).double()  # (16, D)
    for m, s in ((saved, edge), (soft, 0.1)):
        want = soft_coverage_loo(feats, m.reference, radii=m.coverage_radii, softness=s)
        torch.testing.assert_close(m(batch).components["coverage"], want.rewards)
        assert m(batch).values["coverage"] == pytest.approx(want.value)
    assert not torch.allclose(saved(batch).components["coverage"], soft(batch).components["coverage"])


def test_only_weighted_and_logged_components_are_computed(built, monkeypatch):
    """With `log`, a model computes its weighted components and the logged ones, equal to what the
    all-component model gives, and never calls the others' metrics (nor the sizer or realism CNN)."""
    import reward.artifact as art

    _, path = built
    batch = procedural_set(16, size=32, channels=1, seed=7)
    weights = {"mmd": 1.0, "mi": 1.0, "knn_entropy": 0.0, "fid": 0.0, "ot": 0.0, "size": 0.0, "realism": 0.0}
    every = art.load_artifact(path, weights=weights)(batch)
    assert set(every.components) == set(art.COMPONENTS)
    lean = art.load_artifact(path, weights=weights, log=("fid",))
    assert lean.computed == ("mmd", "mi", "fid")
    for name in ("ot_rewards", "knn_entropy_loo", "realism_logits"):
        monkeypatch.setattr(art, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} called for an unused component"))
    monkeypatch.setattr(lean.sizer, "detect", lambda *a: pytest.fail("sizer called for an unused component"))
    out = lean(batch)
    assert set(out.components) == set(out.values) == {"mmd", "mi", "fid"}
    for k in out.components:
        assert torch.equal(out.components[k], every.components[k]), k
    torch.testing.assert_close(out.rewards, every.rewards, rtol=0, atol=0)
    assert art.load_artifact(path, weights=weights, log=()).computed == ("mmd", "mi")
    with pytest.raises(CraterdiffError, match="unknown components.*'sharpness'"):
        art.load_artifact(path, log=("sharpness",))
    with pytest.raises(CraterdiffError, match="pass `size=`"):
        art.load_artifact(path, weights={"size": 1.0}).score(lean.features(batch))


def test_minibatch_ot_is_a_one_to_one_matching_on_a_random_reference_subset(built):
    """`ot_match: minibatch` transports n samples onto n random references: the exact plan is then a
    permutation, so each sample's reward is minus the normalised cost of its partner in the optimal
    assignment. Oracle: scipy's Hungarian solver on the same subset, independent of POT."""
    from scipy.optimize import linear_sum_assignment

    from reward.artifact import load_artifact
    from reward.metrics import pairwise_sq_dists

    _, path = built
    full = load_artifact(path)
    mini = load_artifact(path, ot_match="minibatch")
    assert full.ot_match == "full" and mini.ot_match == "minibatch"
    batch = procedural_set(16, size=32, channels=1, seed=7)
    feats = full.features(batch)  # (16, D)
    m = full.reference.shape[0]
    assert full.ot_reference(16).shape[0] == m

    subset = mini.ot_reference(16, generator=torch.Generator().manual_seed(3))  # (16, D)
    rows = {tuple(r.tolist()) for r in subset}
    assert len(rows) == 16 and rows <= {tuple(r.tolist()) for r in full.reference}
    cost = pairwise_sq_dists(feats, subset)
    cost = cost / float(np.median(cost.numpy()))  # ot_rewards normalises by the median (numpy's convention)
    i, j = linear_sum_assignment(cost.numpy())
    expected = -cost[torch.from_numpy(i), torch.from_numpy(j)]
    got = mini(batch, generator=torch.Generator().manual_seed(3)).components["ot"]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)

    # the same generator state gives the same subset, another gives another; the full match uses no randomness
    again = mini(batch, generator=torch.Generator().manual_seed(3)).components["ot"]
    other = mini(batch, generator=torch.Generator().manual_seed(4)).components["ot"]
    assert torch.equal(got, again) and not torch.equal(got, other)
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    full(batch, generator=g)
    assert torch.equal(g.get_state(), state)


def test_the_reward_stage_is_handed_its_base_model_images(tmp_path, monkeypatch):
    """reward.build never samples a model: without base-model images (and no fake_dir) it refuses in one
    line; rl.build.build_reward_artifact draws n_fake of them from model.pretrained and hands them over."""
    from reward.build import build_and_save
    import rl.build

    cfg = _cfg("data.source=procedural", "data.procedural_n=24", "reward.realism.n_fake=12")
    with pytest.raises(CraterdiffError, match="needs base-model images: set model.pretrained"):  # one line, no sampling
        build_and_save(cfg, tmp_path / "a")
    fake = procedural_set(12, size=32, channels=1, seed=3, n_distinct=2)
    model = build_and_save(cfg, tmp_path / "b", base_images=fake)
    r = model.info["realism"]
    assert r["enabled"] and r["n_fake_train"] + r["n_fake_heldout"] == 12

    asked = []

    def stand_in(cfg_, n, *, seed, device):  # the base model's sampler, recorded
        asked.append(n)
        return fake[:n]
    monkeypatch.setattr(rl.build, "base_model_images", stand_in)
    model = rl.build.build_reward_artifact(cfg, tmp_path / "c")
    assert asked == [12] and (tmp_path / "c" / "reward.yaml").is_file()


@pytest.mark.parametrize("m", [8, 9, 12])
def test_reference_check_refuses_exactly_the_sets_whose_median_distance_is_zero(m):
    """Every split of m images into groups of copies (a few distinct sizes each), against the median heuristic."""
    rng, outcomes = np.random.default_rng(m), set()
    for copies in ([m], [m - 1, 1], [6, 2] + [1] * (m - 8), [5, 3] + [1] * (m - 8), [4, 4] + [1] * (m - 8),
                   [m // 2 + 1] + [1] * (m - m // 2 - 1), [m // 2] + [1] * (m - m // 2), [2] * (m // 2) + [1] * (m % 2)):
        distinct = torch.from_numpy(rng.normal(size=(len(copies), 1, 4, 4)))
        images = torch.cat([distinct[i].expand(c, 1, 4, 4) for i, c in enumerate(copies)])
        try:
            median_bandwidth(images.flatten(1))
            zero = False
        except ValueError:
            zero = True
        outcomes.add(zero)
        if zero:
            with pytest.raises(CraterdiffError, match=f"has {m} images but only {len(copies)} distinct"):
                check_reference(images)
        else:
            check_reference(images)
    assert outcomes == {True, False}
