"""bench.experiments: the variants, the summary over training seeds and the target check."""
from __future__ import annotations

import numpy as np
import pytest

from bench.experiments import REWARDS, summarize_variants, summary_markdown, target_check, variants
from evaluation.run import BASE, CEILING
from utils import load_config


def _cell(values):
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)), "values": list(values)}


def _model(coverage, kid, precision):
    ex = {"coverage": _cell(coverage), "kid_mean": _cell(kid), "precision": _cell(precision)}
    for m in ("recall", "fid", "vendi"):
        ex[m] = _cell([1.0, 2.0, 3.0])
    return {"efficientnet_lite0": ex}


def test_summary_spreads_over_training_seeds_and_checks_the_target():
    report = {"models": {
        BASE: _model([0.70, 0.72, 0.74], [26.0, 27.0, 28.0], [0.84, 0.84, 0.84]),
        CEILING: _model([0.99] * 3, [0.0] * 3, [0.85] * 3),
        "ppo_s0": _model([0.86, 0.88, 0.90], [8.0, 9.0, 10.0], [0.80, 0.80, 0.80]),
        "ppo_s1": _model([0.80, 0.80, 0.80], [12.0, 12.0, 12.0], [0.70, 0.72, 0.74]),
    }, "realism_logit": {BASE: _cell([-1.5, -1.4, -1.6]), "ppo_s0": _cell([1.0, 1.1, 0.9]),
                         "ppo_s1": _cell([2.0, 2.1, 1.9])}}
    s = summarize_variants(report, {"ppo": ["ppo_s0", "ppo_s1"]}, {"ppo": [600.0, 720.0]})
    cov = s["ppo"]["efficientnet_lite0/coverage"]
    assert cov["n"] == 2 and cov["mean"] == pytest.approx(0.84)  # mean of the per-run means 0.88, 0.80
    assert cov["std"] == pytest.approx(np.std([0.88, 0.80], ddof=1))
    assert s[BASE]["efficientnet_lite0/coverage"]["n"] == 3  # one run: spread over sampling seeds
    assert s["ppo"]["realism_logit"]["mean"] == pytest.approx(1.5)
    assert s["ppo"]["wall_min"]["mean"] == pytest.approx(11.0)
    assert "realism_logit" not in s[CEILING] and s["ppo"]["spread_over"] == "training seeds"

    t = target_check(s, "ppo")
    c = t["checks"]
    assert c["coverage"]["target"] == pytest.approx(0.72 + (0.99 - 0.72) / 2)  # 0.855: 0.84 falls short
    assert c["kid_mean"]["target"] == pytest.approx(13.5) and c["kid_mean"]["met"]  # 10.5 <= 13.5
    assert c["precision"]["target"] == pytest.approx(0.74) and c["precision"]["met"]  # 0.76
    assert c["wall_min"]["met"] and not c["coverage"]["met"] and not t["met"]
    md = summary_markdown("main", s, {"ppo": t}, {"set": "main"})
    assert "| ppo | 0.840 ✗ | 10.500 ✓ | 0.760 ✓ | 11.000 ✓ | NOT met |" in md and "0.840 ± 0.057" in md
    assert "coverage ≥ 0.855" in md


def test_ablation_variants_set_every_weight_and_load():
    vs = variants("ablation", realism_weight=0.25)
    assert [v.name for v in vs][:2] == ["mmd", "mmd+realism"] and len(vs) == 2 * len(REWARDS)
    for v in vs:
        cfg = load_config(v.cfg, list(v.overrides))
        w = vars(cfg.reward.weights)
        name = v.name.removesuffix("+realism")
        assert {c for c, x in w.items() if x > 0 and c != "realism"} == set(REWARDS[name])
        assert w["realism"] == (0.25 if v.name.endswith("+realism") else 0.0)
    assert [v.name for v in variants("main", realism_weight=0.5)] == ["ppo", "trpo", "sac", "sac_td0"]


def test_tune_variants_are_valid_overrides_of_the_default():
    from bench.experiments import TUNING

    vs = variants("tune", realism_weight=0.5)
    assert [v.name for v in vs] == list(TUNING)
    assert {c for c, w in vars(load_config(vs[0].cfg, list(vs[0].overrides)).reward.weights).items() if w} == {"ot"}
    default = load_config(vs[0].cfg)
    for v in vs:
        cfg = load_config(v.cfg, list(v.overrides))
        assert cfg != default, v.name  # every lever changes something
    mini = load_config(vs[0].cfg, list(TUNING["ot_minibatch"]))
    assert mini.reward.ot_match == "minibatch" and default.reward.ot_match == "full"
