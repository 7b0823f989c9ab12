"""bench.trpo end to end on a shrunk problem: both algorithms timed side by side, the trust region held, the
Fisher-product methods compared, the PPO profile written; and bench.iteration's split and overheads."""
from __future__ import annotations

import json
import math

import pytest

from bench import trpo as bench_trpo

SHRINK = ["sampler.num_steps=2", "rl.batch_size=8", "rl.microbatch=4", "reward.features.input_size=32",
          "reward.realism.epochs=1", "reward.realism.n_fake=8", "rl.trpo.kl_states=4", "rl.trpo.cg_iters=2",
          "log.trackers=[csv]"]


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
    assert methods["fd_forward"]["rel_error_vs_jvp"] < 1e-2
    assert ppo["bound_sample_s"] > 0 and ppo["bound_update_s"] > 0 and ppo["overhead_total"] > 0
    top = ppo["profile_top"]
    assert top and all(e["self_cpu_s"] >= 0 for e in top) and 0 < sum(e["share"] for e in top) <= 1 + 1e-9
    assert "Self CPU" in (tmp_path / "ppo_profile.txt").read_text()


def test_bench_iteration_splits_an_iteration_against_the_unet_bound(tmp_path):
    from bench import iteration as bench_iteration

    args = ["--out", str(tmp_path), "--cfg", "configs/default.yaml", "--repeats", "2",
            *(a for s in [*SHRINK, f"reward.artifact={tmp_path / 'reward'}"] for a in ("--set", s))]
    bench_iteration.main(args)
    r = json.loads((tmp_path / "iteration.json").read_text())
    assert (r["batch"], r["T"], r["microbatch"]) == (8, 2, 4)
    assert r["bound_sample_s"] == pytest.approx(2 * r["unet_forward_batch_s"])
    # the overheads are the fastest timed iteration's phases over the bound's
    assert r["min_time_sample_s"] <= r["time_sample_s"] and r["min_time_update_s"] <= r["time_update_s"]
    assert r["overhead_total"] == pytest.approx((r["min_time_sample_s"] + r["min_time_update_s"])
                                                / (r["bound_sample_s"] + r["bound_update_s"]))
    assert r["overhead_sample"] == pytest.approx(r["min_time_sample_s"] / r["bound_sample_s"])


def test_bench_trpo_solve_scores_each_solve_against_the_exact_kl(tmp_path):
    """With F on every state (tiny damping, a small δ: the quadratic regime) the step β x the model puts on δ has
    exact KL δ over the batch; a 4-state solve is scored against the same exact KL, the probe's estimate beside it."""
    from bench import trpo_solve

    args = ["--out", str(tmp_path), "--cfg", "configs/trpo.yaml", "--iterations", "2", "--draws", "2",
            "--settings", "0:5:fd", "4:2:fd_forward", "4:2:fd_forward:curvature",
            *(a for s in [*SHRINK, f"reward.artifact={tmp_path / 'reward'}", "rl.trpo.damping=1e-6",
                          "rl.trpo.max_kl=1e-6", "rl.trpo.probe_states=8"] for a in ("--set", s))]
    trpo_solve.main(args)
    result = json.loads((tmp_path / "solve.json").read_text())
    assert len(result["solves"]) == 3 * 2 * 2
    full, cheap = result["summary"]["0:5:fd"], result["summary"]["4:2:fd_forward"]
    assert full["eta_relative"] == pytest.approx(1.0) and full["probe_over_exact"] is None
    assert full["kl_over_delta"] == pytest.approx(1.0, rel=0.05)
    assert all(math.isfinite(r["eta"]) and r["eta"] > 0 for r in result["solves"])
    assert cheap["probe_over_exact"] > 0 and cheap["solves"] == 4
    stratified = result["summary"]["4:2:fd_forward:curvature"]
    assert stratified["solves"] == 4 and stratified["probe_over_exact"] > 0 and stratified["eta_relative"] > 0


def test_bench_trpo_solve_refuses_a_malformed_setting(tmp_path, capsys):
    from bench import trpo_solve

    for bad in ("32:eight:fd", "16:8:fd:random"):
        with pytest.raises(SystemExit, match=r"not STATES:CG_ITERS:METHOD\[:DRAW\]"):
            trpo_solve.main(["--out", str(tmp_path), "--settings", bad])


def test_bench_microbatch_same_update_at_each_size(tmp_path, capsys):
    """The sizes run the same optimizer steps on the same trajectories: the first update's gradient norm, loss and
    KL agree to rounding; a size that does not divide an optimizer step's trajectories is refused."""
    from bench import microbatch

    shrink = [*SHRINK, "rl.gradient_accumulation=2", f"reward.artifact={tmp_path / 'reward'}"]
    args = ["--out", str(tmp_path), "--cfg", "configs/default.yaml", "--repeats", "1", "--microbatch", "2", "4", "8",
            *(a for s in shrink for a in ("--set", s))]
    microbatch.main(args)
    r = json.loads((tmp_path / "microbatch.json").read_text())
    assert r["trajectories_per_optimizer_step"] == 8 and set(r["per_microbatch"]) == {"2", "4", "8"}
    for m in ("4", "8"):
        assert r["first_grad_norm_relative_difference"][m] < 1e-4
        for k in ("loss", "kl"):
            assert r["first_iteration"][m][k] == pytest.approx(r["first_iteration"]["2"][k], rel=1e-4, abs=1e-7)
        assert r["per_microbatch"][m]["iteration_vs_first"] > 0
    with pytest.raises(SystemExit):
        microbatch.main([*args[:7], "3", "4", *args[10:]])
    assert "must divide the 8 trajectories" in capsys.readouterr().err
