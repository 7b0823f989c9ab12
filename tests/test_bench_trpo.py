"""bench.trpo end to end on a shrunk problem: both algorithms timed side by side, the trust region held, the
Fisher-product methods compared, the PPO profile written."""
from __future__ import annotations

import json

from bench import trpo as bench_trpo

SHRINK = ["sampler.num_steps=2", "rl.batch_size=8", "rl.microbatch=4", "reward.features.input_size=32",
          "reward.realism.epochs=1", "reward.realism.n_fake=8", "rl.trpo.kl_states=4", "rl.trpo.cg_iters=2",
          "tensorboard=false"]


def test_bench_trpo_runs_both_algorithms_side_by_side(tmp_path):
    args = ["--out", str(tmp_path), "--repeats", "1", "--profile", "--variants", "ppo", "trpo",
            *(a for s in [*SHRINK, f"reward.artifact={tmp_path / 'reward'}"] for a in ("--set", s))]
    bench_trpo.main(args)
    result = json.loads((tmp_path / "trpo.json").read_text())
    ppo, trpo = result["variants"]["ppo"], result["variants"]["trpo"]
    assert (ppo["batch"], ppo["T"]) == (trpo["batch"], trpo["T"]) == (8, 2)
    assert ppo["time_vs_ppo"] == 1.0 and trpo["time_vs_ppo"] == trpo["time_iteration_s"] / ppo["time_iteration_s"]
    for k in ("time_gradient_s", "time_cg_s", "time_line_search_s", "cg_residual", "backtrack_iters"):
        assert trpo[k] >= 0, k
    assert trpo["every_accepted_kl_within_delta"] and trpo["max_accepted_kl"] <= trpo["max_kl"]
    methods = trpo["fvp_methods"]
    assert methods["jvp"]["rel_error_vs_jvp"] == 0.0
    assert methods["fd"]["rel_error_vs_jvp"] < 1e-2 and methods["double_vjp"]["rel_error_vs_jvp"] < 1e-3
    assert ppo["bound_sample_s"] > 0 and ppo["bound_update_s"] > 0 and ppo["overhead_total"] > 0
    top = ppo["profile_top"]
    assert top and all(e["self_cpu_s"] >= 0 for e in top) and 0 < sum(e["share"] for e in top) <= 1 + 1e-9
    assert "Self CPU" in (tmp_path / "ppo_profile.txt").read_text()
