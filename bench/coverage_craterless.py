"""Can the `coverage` reward say "nothing here"? Its set value C(X) on real held-out tiles against craterless ones.

    python -m bench.coverage_craterless --artifact runs/bench/reward --out DIR [--softness 0.1 0.03 0.01 0.001]

Draws of n held-out tiles, of their phase-scrambled copies and of smooth noise (`data.surrogates.craterless_sets`)
are scored by `reward.metrics.soft_coverage_loo` against the artifact's reference, in its features and with its
5-NN radii, at each edge softness (0.001 is nearly the hard coverage of Naeem et al. 2020). A coverage reward that
gives craterless sets nearly the real tiles' C(X) pays for texture. Writes `DIR/coverage_craterless.json` and prints
one line per softness.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from data.datasets import load_mars_craters
from data.surrogates import craterless_sets
from reward.artifact import load_artifact
from reward.metrics import soft_coverage_loo


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="a reward artifact directory (scripts.train_reward_model)")
    p.add_argument("--out", required=True, help="directory for coverage_craterless.json")
    p.add_argument("--softness", type=float, nargs="+", default=[0.1, 0.03, 0.01, 0.001])
    p.add_argument("--n", type=int, default=64, help="tiles per draw (the default's RL batch)")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--size", type=int, default=32, help="tile side in pixels (the policy's image size)")
    args = p.parse_args(argv)

    model = load_artifact(args.artifact)
    heldout, _ = load_mars_craters(split="heldout", size=args.size)  # (131, 1, size, size)
    sets = {"real held-out": heldout, **craterless_sets(heldout)}
    feats = {}  # set -> [(n, d) features per draw]
    for name, x in sets.items():
        draws = [torch.randperm(len(x), generator=torch.Generator().manual_seed(s))[: args.n] for s in range(args.draws)]
        feats[name] = [model.features(x[i]) for i in draws]
    result = {"n": args.n, "draws": args.draws, "artifact": str(args.artifact), "softness": {}}
    for soft in args.softness:
        row = {name: [soft_coverage_loo(f, model.reference, radii=model.coverage_radii, softness=soft).value
                      for f in fs] for name, fs in feats.items()}
        result["softness"][soft] = {name: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
                                    for name, v in row.items()}
        print(f"softness {soft:<6} " + " | ".join(f"{name} C = {np.mean(v):.3f}" for name, v in row.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coverage_craterless.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
