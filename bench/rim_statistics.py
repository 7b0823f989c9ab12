"""Which rim statistic, the whole ring or two opposite arcs of it? The rim detector (`reward/rims.py`) with each
statistic, calibrated on the train tiles and validated as every report validates it (`validate_instrument`), on the
held-out tiles, their phase-scrambled copies, smooth noise and, as broken rims, the held-out tiles with their
quadrants shuffled (`data.surrogates.quadrant_shuffle`, one set per shuffle seed), to which the craterless goals are
applied too: pieces of rims are not a crater.

    python -m bench.rim_statistics --out DIR [--opposite 8:1 16:5] [--shuffles 6] [--grids PNG ...]

Each `--opposite K:m` is the opposite-arcs statistic on K sectors with arcs of m sectors. Writes
DIR/rim_statistics.json and prints one line per statistic, with the binomial standard error of the detected share
≥ 100 km (the sets are small: one tile of the held-out set is 0.008). `--grids` takes the reports' grids of the 32 largest
craters the whole ring detected (`largest_rims_*.png`: 32 px tiles shown at 2×) and counts, for each statistic, the
tiles it calls ≥ 100 km: where a model's large craters are broken rims, the opposite-arcs statistics drop them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from data.datasets import load_mars_craters
from bench.grid_duplicates import grid_tiles
from data.surrogates import craterless_sets, quadrant_shuffle
from reward.rims import fit_rim_detector
from evaluation.sizes import LARGE_KM, WINDOW_KM, SizeInstrument, share_called, validate_instrument
from utils import apply_threads


def grid_images(path: Path) -> torch.Tensor:
    """(N, 1, 32, 32) tiles in [-1, 1] of a report's grid (32 px tiles enlarged 2× by nearest neighbour)."""
    tiles = grid_tiles(path, tile=64, pad=2).reshape(-1, 64, 64)[:, ::2, ::2]  # (N, 32, 32) in 0..255
    return torch.from_numpy(tiles / 127.5 - 1.0).float()[:, None]


def large_in_grid(instrument: SizeInstrument, tiles: torch.Tensor) -> int:
    """How many of the tiles the instrument calls ≥ 100 km craters."""
    found, d_km = instrument.detect_km(tiles)
    return round(share_called(found, d_km, LARGE_KM) * len(tiles))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for rim_statistics.json")
    p.add_argument("--opposite", nargs="+", default=["8:1", "16:5"], metavar="K:m",
                   help="opposite-arcs variants: K sectors, arcs of m sectors")
    p.add_argument("--shuffles", type=int, default=6, help="quadrant-shuffled sets (seeds 0..N-1)")
    p.add_argument("--grids", nargs="*", type=Path, default=[], help="largest_rims_*.png grids to count in")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    missing = [str(g) for g in args.grids if not g.is_file()]
    if missing:
        p.error(f"no such grid image: {', '.join(missing)}")
    apply_threads(args.threads)
    grids = {str(g): grid_images(g) for g in args.grids}
    (train, train_rows), (held, held_rows) = (load_mars_craters(split=s, size=32) for s in ("train", "heldout"))
    train_km, held_km = (np.array([float(r["diameter_km"]) for r in rows]) for rows in (train_rows, held_rows))
    sets = {**craterless_sets(held), **{f"quadrant-shuffled {s}": quadrant_shuffle(held, torch.Generator().manual_seed(s))
                                        for s in range(args.shuffles)}}
    arcs = [tuple(int(v) for v in spec.split(":")) for spec in args.opposite]
    variants = {"ring": {}, **{f"opposite{k}:{m}": {"statistic": "opposite", "sectors": k, "arc": m} for k, m in arcs}}
    results = {}
    for name, kw in variants.items():
        t0 = time.perf_counter()
        det = fit_rim_detector(train, train_km / WINDOW_KM, **kw)
        v = validate_instrument(SizeInstrument("rims", det, info={"kappa": det.kappa, **kw}), held, held_km, sets)
        v["seconds"] = time.perf_counter() - t0
        results[name] = v
        real = v["sets"]["real held-out"]
        broken = [r["share_ge100"] for n, r in v["sets"].items() if n.startswith("quadrant")]
        share, hits = real["share_ge100_detected"], real["detect_rate"] * real["n"]
        v["share_ge100_detected_se"] = float(np.sqrt(share * (1 - share) / max(hits, 1)))
        print(f"{name:12s} real: detected {real['detect_rate']:.3f}, share >= 100 km of detected {share:.3f} ± "
              f"{v['share_ge100_detected_se']:.3f} (catalogue {real['catalogue_share_ge100']:.3f}), rho "
              f"{real['spearman']:.3f}; quadrant-shuffled called >= 100 km {np.mean(broken):.3f} "
              f"({min(broken):.3f}-{max(broken):.3f}); craterless {v['sets']['phase-scrambled held-out']['share_ge100']:.3f}"
              f" / {v['sets']['smooth noise']['share_ge100']:.3f}; goals met {sum(v['goals'].values())}/{len(v['goals'])}")
        v["grids"] = {g: large_in_grid(SizeInstrument("rims", det), x) for g, x in grids.items()}
    for g in grids:
        print(f"{g}: called >= 100 km of {len(grids[g])} tiles: "
              + ", ".join(f"{name} {results[name]['grids'][g]}" for name in variants))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rim_statistics.json").write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
