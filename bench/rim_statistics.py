"""Which rim statistic, the whole ring or two opposite sides of it? The rim detector (`evaluation/rims.py`) with each
statistic, calibrated on the train tiles and validated as every report validates it (`validate_instrument`), on the
held-out tiles, their phase-scrambled copies, smooth noise and, as broken rims, the held-out tiles with their
quadrants shuffled (`data.surrogates.quadrant_shuffle`, one set per shuffle seed), to which the craterless goals are
applied too: pieces of rims are not a crater.

    python -m bench.rim_statistics --out DIR [--sectors 4 8] [--shuffles 3]

Writes DIR/rim_statistics.json and prints one line per statistic.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from data.datasets import load_mars_craters
from data.surrogates import craterless_sets, quadrant_shuffle
from evaluation.rims import fit_rim_detector
from evaluation.sizes import WINDOW_KM, SizeInstrument, validate_instrument
from utils import apply_threads


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for rim_statistics.json")
    p.add_argument("--sectors", type=int, nargs="+", default=[4, 8], help="K of each opposite-sides variant")
    p.add_argument("--shuffles", type=int, default=3, help="quadrant-shuffled sets (seeds 0..N-1)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    (train, train_rows), (held, held_rows) = (load_mars_craters(split=s, size=32) for s in ("train", "heldout"))
    train_km, held_km = (np.array([float(r["diameter_km"]) for r in rows]) for rows in (train_rows, held_rows))
    sets = {**craterless_sets(held), **{f"quadrant-shuffled {s}": quadrant_shuffle(held, torch.Generator().manual_seed(s))
                                        for s in range(args.shuffles)}}
    variants = {"ring": {}, **{f"opposite{k}": {"statistic": "opposite", "sectors": k} for k in args.sectors}}
    results = {}
    for name, kw in variants.items():
        t0 = time.perf_counter()
        det = fit_rim_detector(train, train_km / WINDOW_KM, **kw)
        v = validate_instrument(SizeInstrument("rims", det, info={"kappa": det.kappa, **kw}), held, held_km, sets)
        v["seconds"] = time.perf_counter() - t0
        results[name] = v
        real = v["sets"]["real held-out"]
        broken = [r["share_ge100"] for n, r in v["sets"].items() if n.startswith("quadrant")]
        print(f"{name:10s} real: detected {real['detect_rate']:.3f}, share >= 100 km of detected "
              f"{real['share_ge100_detected']:.3f} (catalogue {real['catalogue_share_ge100']:.3f}), rho "
              f"{real['spearman']:.3f}; quadrant-shuffled called >= 100 km {np.mean(broken):.3f} "
              f"({min(broken):.3f}-{max(broken):.3f}); craterless {v['sets']['phase-scrambled held-out']['share_ge100']:.3f}"
              f" / {v['sets']['smooth noise']['share_ge100']:.3f}; goals met {sum(v['goals'].values())}/{len(v['goals'])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rim_statistics.json").write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
