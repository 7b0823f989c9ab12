"""The backward microbatch of the default's update, side by side in one process.

    python -m bench.microbatch --out DIR [--cfg configs/default.yaml] [--microbatch 16 32] [--repeats 4]

One Finetuner per microbatch size, each from the same seed (so the same first batch of trajectories, the same
advantages and the same optimizer steps: an optimizer step follows every `rl.gradient_accumulation` microbatches,
so each size runs with the accumulation that keeps the config's microbatch × accumulation trajectories per step;
the microbatch then sets only how many trajectories one backward pass carries). Their first iteration's gradient
norm then differs only by rounding (reported relative to the first size's, with the loss and KL beside it; the
parameters themselves are no test: Adam's first step, lr·g/|g|, turns the rounding of near-zero gradient entries
into steps of size lr). Then `repeats` rounds of one iteration each, the variants alternating within a round, so
the machine's drift falls on all of them alike; per variant the median (`bench.iteration.medians`) and the fastest
of the update, sampling and reward times. Peak memory is `bench.memory`'s (one process per
setting). Writes DIR/microbatch.json and prints a table.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.iteration import TIMES, bench_parser, medians
from config import load_config
from rl.trainer import Finetuner
from utils import apply_threads


FIRST = ("loss", "kl", "grad_norm")
"""The first iteration's update statistics reported for each size."""


def compare(cfg_path: str, overrides: list[str], sizes: list[int], group: int, repeats: int, out: Path) -> dict:
    """The measurement of the module docstring, for each microbatch in `sizes`, `group` trajectories per optimizer
    step."""
    fts, first = {}, {}
    for m in sizes:  # each built and run once before the next is seeded: the same trajectories for each
        cfg = load_config(cfg_path, [*overrides, f"rl.microbatch={m}",
                                     f"rl.gradient_accumulation={group // m}"])
        apply_threads(cfg.num_threads)
        fts[m] = Finetuner(cfg, out / f"microbatch_{m}")
        first[m] = fts[m].iteration()[0]
    rows: dict[int, list[dict[str, float]]] = {m: [] for m in sizes}
    g0 = first[sizes[0]]["grad_norm"]
    rounding = {m: abs(first[m]["grad_norm"] - g0) / g0 for m in sizes[1:]}
    for _ in range(repeats):
        for m in sizes:
            rows[m].append(fts[m].iteration()[0])
    per = {}
    for m in sizes:
        per[m] = {**{f"median_{k}": v for k, v in medians(rows[m]).items()},
                  **{f"min_{k}": min(r[k] for r in rows[m]) for k in TIMES}}
    ref = per[sizes[0]]
    for m in sizes[1:]:
        per[m]["update_vs_first"] = per[m]["median_time_update_s"] / ref["median_time_update_s"]
        per[m]["iteration_vs_first"] = per[m]["median_time_iteration_s"] / ref["median_time_iteration_s"]
    cfg = fts[sizes[0]].cfg
    return {"config": cfg_path, "overrides": overrides, "batch": cfg.rl.batch_size, "T": cfg.sampler.num_steps,
            "trajectories_per_optimizer_step": group, "threads": torch.get_num_threads(),
            "repeats": repeats, "first_iteration": {str(m): {k: first[m][k] for k in FIRST} for m in sizes},
            "first_grad_norm_relative_difference": {str(m): v for m, v in rounding.items()},
            "per_microbatch": {str(m): v for m, v in per.items()}}


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__)
    p.add_argument("--microbatch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args(argv)
    if len(args.microbatch) < 2:
        p.error("--microbatch needs two or more sizes to compare, e.g. --microbatch 16 32")
    rl = load_config(args.cfg, args.overrides).rl
    group = rl.microbatch * rl.gradient_accumulation  # trajectories per optimizer step
    if any(group % m for m in args.microbatch):
        p.error(f"each --microbatch must divide the {group} trajectories of an optimizer step "
                f"(rl.microbatch × rl.gradient_accumulation of the config), e.g. {group // 2} {group}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the Finetuners' run directories: iterations alone write nothing there
    result = compare(args.cfg, args.overrides, args.microbatch, group, args.repeats, out / "runs")
    (out / "microbatch.json").write_text(json.dumps(result, indent=2))
    print(f"{'microbatch':>10} {'update s':>9} {'sample s':>9} {'reward s':>9} {'iteration s':>12} {'vs first':>9}")
    for m, v in result["per_microbatch"].items():
        print(f"{m:>10} {v['median_time_update_s']:9.2f} {v['median_time_sample_s']:9.2f} "
              f"{v['median_time_reward_s']:9.2f} {v['median_time_iteration_s']:12.2f} "
              f"{v.get('iteration_vs_first', 1.0):9.3f}")
    print("first iteration's gradient norm, relative difference from the first size's:",
          result["first_grad_norm_relative_difference"])


if __name__ == "__main__":
    main()
