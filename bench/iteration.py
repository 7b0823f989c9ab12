"""Where the time of one RL iteration goes, against the UNet-evaluation bound.

    python -m bench.iteration --out DIR [--cfg configs/default.yaml] [--repeats 3]

Runs `repeats` iterations of the configured fine-tuning (after one warm-up) and splits each into
sampling, reward and update time. The bound counts the UNet evaluations an iteration cannot avoid:
sampling makes T forward passes at batch B; a PPO update makes, per epoch, T forward+backward
passes per microbatch, plus a base-model forward per step held by a KL to the base (TRPO and the
trajectory ratio make more, and say so); the latent mode's
update makes T forward passes per microbatch (the UNet is frozen: no backward through it), the
schedule mode's none (its one action per trajectory needs only the head). Each is multiplied by
the measured time of one such pass, the bound timed before each iteration. overhead = measured / bound
(1.0 = nothing but UNet work), both the fastest of their repeats (interference from other work only adds
time; the medians are kept too).
Writes DIR/iteration.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from config import load_config
from rl.policy import FROZEN_UNET_MODES
from rl.trainer import Finetuner
from rl.update import kl_base_coefficients
from basics import PROJECT_ROOT
from utils import apply_threads


def time_call(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` calls after a warm-up: other work on the machine only ever adds time."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def unet_bound(ft: Finetuner, repeats: int = 5) -> dict[str, float]:
    """The UNet-evaluation bound of one iteration of `ft`'s configuration: T forward passes at batch B to
    sample, and per update pass T forward+backward passes per microbatch (none for the schedule mode; forward
    only for the latent mode), each timed as the median of `repeats` calls (docstring above)."""
    cfg, r = ft.cfg, ft.cfg.rl
    T, B, mb = cfg.sampler.num_steps, r.batch_size, r.microbatch
    c, s, _ = ft.policy.image_shape
    unet, dev = ft.policy.unet, ft.device
    t_b = ft.policy.schedule.timesteps[0]
    x_b = torch.randn(B, c, s, s, device=dev)
    x_mb = torch.randn(mb, c, s, s, device=dev)
    frozen = r.policy_mode in FROZEN_UNET_MODES

    def fwd():
        with torch.no_grad():
            unet(x_b, t_b.expand(B).to(dev))

    def fwd_bwd():
        if frozen:
            with torch.no_grad():
                unet(x_mb, t_b.expand(mb).to(dev))
        else:
            unet(x_mb, t_b.expand(mb).to(dev)).sample.mean().backward()

    def fwd_mb():
        with torch.no_grad():
            unet(x_mb, t_b.expand(mb).to(dev))

    t_fwd, t_fwd_bwd, t_fwd_mb = time_call(fwd, repeats), time_call(fwd_bwd, repeats), time_call(fwd_mb, repeats)
    unet.zero_grad(set_to_none=True)
    n_mb = -(-B // mb)
    passes = r.ppo.epochs * (2 if r.ppo.ratio == "trajectory" else 1) if r.algorithm == "ppo" else 1
    # the KL to the base model (rl.kl_base_coef, rl.kl_final_coef) costs one base forward per regularised step
    regularised = sum(b > 0 for b in kl_base_coefficients(ft.policy, r))
    update = passes * n_mb * (T * t_fwd_bwd + regularised * t_fwd_mb)
    return {"unet_forward_batch_s": t_fwd, "unet_forward_backward_microbatch_s": t_fwd_bwd,
            "unet_forward_microbatch_s": t_fwd_mb, "bound_sample_s": T * t_fwd,
            "bound_update_s": 0.0 if r.policy_mode == "schedule" else update}


def timed_iterations(cfg, out: Path, repeats: int, *, bound: bool = True
                     ) -> tuple[Finetuner, list[dict[str, float]], dict[str, float] | None]:
    """One warm-up iteration, then `repeats` timed ones (their metrics rows); with `bound`, `unet_bound` is
    measured before each and each of its figures is the fastest over all rounds (else None). This machine's
    speed drifts by ~10 % within minutes, so a bound timed apart from the iterations would put that drift into
    the overhead."""
    ft = Finetuner(cfg, out)
    ft.iteration()  # warm-up
    rows, bounds = [], []
    for _ in range(repeats):
        if bound:
            bounds.append(unet_bound(ft))
        rows.append(ft.iteration()[0])
    return ft, rows, ({k: min(b[k] for b in bounds) for k in bounds[0]} if bound else None)


TIMES = ("time_sample_s", "time_reward_s", "time_update_s")
"""An iteration's phases, as logged."""


def medians(rows: list[dict[str, float]], fields=TIMES) -> dict[str, float]:
    """The median over the timed iterations of each of `fields` that every row has, and time_iteration_s, the
    median of the phases' sum."""
    med = {k: statistics.median(r[k] for r in rows) for k in fields if all(k in r for r in rows)}
    med["time_iteration_s"] = statistics.median(sum(r[k] for k in TIMES) for r in rows)
    return med


def overheads(rows: list[dict[str, float]], bound: dict[str, float]) -> dict[str, float | None]:
    """measured / bound for sampling, update and both: the fastest timed iteration's phases (also returned, as
    `min_` + the row's key) over `unet_bound`'s."""
    s, u = min(r["time_sample_s"] for r in rows), min(r["time_update_s"] for r in rows)
    return {"min_time_sample_s": s, "min_time_update_s": u, "overhead_sample": s / bound["bound_sample_s"],
            "overhead_update": u / bound["bound_update_s"] if bound["bound_update_s"] else None,
            "overhead_total": (s + u) / (bound["bound_sample_s"] + bound["bound_update_s"])}


def bench_parser(description: str, cfg: str = "default.yaml") -> argparse.ArgumentParser:
    """The arguments a benchmark of one config shares: --out DIR (required), --cfg (default configs/`cfg`) and
    --set overrides; the module docstring as the help text."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--cfg", default=str(PROJECT_ROOT / "configs" / cfg))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    return p


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.cfg, args.overrides)
    apply_threads(cfg.num_threads)
    ft, rows, bound = timed_iterations(cfg, out / "run", args.repeats)
    r = cfg.rl
    med = medians(rows)
    bound_sample, bound_update = bound["bound_sample_s"], bound["bound_update_s"]
    T, B, mb, dev = cfg.sampler.num_steps, r.batch_size, r.microbatch, ft.device
    t_fwd, t_fwd_bwd = bound["unet_forward_batch_s"], bound["unet_forward_backward_microbatch_s"]
    result = {
        "config": args.cfg, "algorithm": r.algorithm, "policy_mode": r.policy_mode, "T": T, "batch": B,
        "microbatch": mb, "device": str(dev), "threads": torch.get_num_threads(),
        "unet_forward_batch_s": t_fwd, "unet_forward_backward_microbatch_s": t_fwd_bwd,
        **med, "bound_sample_s": bound_sample, "bound_update_s": bound_update,
        **overheads(rows, bound),
        "reward_share": med["time_reward_s"] / sum(med[k] for k in TIMES),
        "update_bound_note": ("TRPO adds CG Fisher-vector products and line-search passes beyond this bound"
                              if r.algorithm == "trpo" else "PPO/REINFORCE: one forward+backward per step"),
    }
    (out / "iteration.json").write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:<36} {v:.4g}" if isinstance(v, float) else f"{k:<36} {v}")


if __name__ == "__main__":
    main()
