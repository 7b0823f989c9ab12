"""Peak memory of one PPO update against the number of denoising steps T.

    python -m bench.memory --out DIR [--steps 10 20 40] [--batch 64] [--microbatch 16]

Each (T, method) runs in a fresh process: the shipped 32 px base model samples a batch of B
trajectories of T steps (pass 1), then one update runs and the process's peak memory during it is
read (CPU: peak RSS from getrusage; CUDA: the allocator's peak). `two_pass` is the toolkit's
`rl.ppo.ppo_update` (backward per step, graph freed at once); `single_graph` builds the loss of all
T steps in one autograd graph before one backward, as a naive implementation would. Writes
DIR/memory.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch


def measure(steps: int, method: str, batch: int, microbatch: int, device: str) -> dict:
    """Run in this process: sample, then one update; return the peaks before and during it."""
    from ddpm.pipeline import SHIPPED_MODEL, load_pipeline
    from rl.advantages import standardize
    from rl.policy import DiffusionPolicy
    from rl.ppo import ppo_clip_loss, ppo_update
    from rl.update import UpdateBatch
    from config import RLConfig, SamplerConfig, config_from_dict
    from utils import peak_mem_mb

    dev = torch.device(device)
    torch.manual_seed(0)
    unet, sched = load_pipeline(SHIPPED_MODEL)
    policy = DiffusionPolicy(unet.to(dev), sched, SamplerConfig(num_steps=steps, sigma_floor=0.05))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    traj = policy.sample(batch, generator=gen)
    adv = standardize(traj.images.mean((1, 2, 3)).cpu())
    cfg = config_from_dict({"microbatch": microbatch, "gradient_accumulation": batch // microbatch, "kl_final_coef": 0.0,
                            "step_weighting": "uniform"}, cls=RLConfig)  # the plain update: no base model kept
    # one warm-up update so that optimizer state and allocator caches exist before measuring
    ppo_update(UpdateBatch(policy, opt, traj, adv, cfg, gen))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    before = peak_mem_mb(dev)
    if method == "two_pass":
        ppo_update(UpdateBatch(policy, opt, traj, adv, cfg, gen))
    else:
        opt.zero_grad()
        for idx in torch.arange(batch).split(microbatch):
            losses = [ppo_clip_loss(policy.step(k, traj.x_t[k, idx], traj.x_prev[k, idx]).logp,
                                    traj.logp[k, idx].to(dev), adv[idx].to(dev), clip_range=0.01).loss
                      for k in range(steps)]
            (torch.stack(losses).mean() * len(idx) / batch).backward()
        opt.step()
    return {"steps": steps, "method": method, "peak_mb": peak_mem_mb(dev), "peak_before_update_mb": before,
            "device": str(dev)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--microbatch", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", nargs=2, metavar=("T", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(int(args.child[0]), args.child[1], args.batch, args.microbatch, args.device)))
        return
    rows = []
    for method in ("two_pass", "single_graph"):
        for t in args.steps:
            proc = subprocess.run([sys.executable, "-m", "bench.memory", "--out", args.out, "--batch", str(args.batch),
                                   "--microbatch", str(args.microbatch), "--device", args.device,
                                   "--child", str(t), method], capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{method:<13} T={t:<3} peak {r['peak_mb']:8.1f} MB   (before the update {r['peak_before_update_mb']:.1f} MB)",
                  flush=True)
    two = [r["peak_mb"] for r in rows if r["method"] == "two_pass"]
    growth = max(two) / min(two) - 1
    summary = {"two_pass_peak_growth_across_T": growth, "two_pass_within_10pct": growth <= 0.10,
               "batch": args.batch, "microbatch": args.microbatch, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(summary, indent=2))
    print(f"two-pass peak grows {100 * growth:.1f}% from T={min(args.steps)} to T={max(args.steps)}; "
          f"wrote {out / 'memory.json'}")


if __name__ == "__main__":
    main()
