"""Do the size detectors call broken rims large craters? Shares called ≥ 100 and ≥ 150 km on tiles whose quadrants
were turned and reordered (`data.surrogates.quadrant_shuffle`): texture and local arcs kept, the tile's centred
crater cut into four quarter arcs and moved. Where intact tiles are called large and their shuffled copies are
too, the detector counts pieces of a rim as a crater.

    python -m bench.broken_rims --out DIR [--cfg CFG] [--model NAME=MODEL_DIR ...]

Rows: the held-out tiles real, quadrant-shuffled and phase-scrambled; for each `--model`, 3 sampling seeds × 150
samples drawn with CFG's sampler (as `scripts.eval` draws every model), as drawn and quadrant-shuffled. Both detectors are calibrated on the train tiles as in `scripts.eval`
(`evaluation.sizes.build_instruments`). Writes `DIR/broken_rims.json` and prints one line per set.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from config import load_config
from data.datasets import load_mars_craters
from data.surrogates import phase_scramble, quadrant_shuffle
from evaluation.sizes import HUGE_KM, LARGE_KM, build_instruments, share_called
from evaluation.run import parse_model_args
from basics import CraterdiffError
from utils import resolve_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for broken_rims.json")
    p.add_argument("--cfg", default="configs/default.yaml", help="the config whose sampler draws every --model")
    p.add_argument("--model", action="append", default=[], metavar="NAME=MODEL_DIR",
                   help="a saved model to sample (e.g. trpo=runs/x/model); repeatable")
    p.add_argument("--n", type=int, default=150, help="samples per sampling seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    try:
        models = parse_model_args(args.model)
        cfg = load_config(resolve_path(args.cfg))
    except CraterdiffError as e:
        p.error(str(e))

    from rl.build import model_sampler

    train, train_rec = load_mars_craters(split="train", size=32)
    heldout, _ = load_mars_craters(split="heldout", size=32)               # (131, 1, 32, 32)
    instruments = build_instruments(train, np.array([r["diameter_km"] for r in train_rec]))
    g = torch.Generator().manual_seed(0)
    sets = {"held-out": heldout, "held-out, quadrant-shuffled": quadrant_shuffle(heldout, g),
            "held-out, phase-scrambled": phase_scramble(heldout, g)}
    for name, path in models.items():
        sample = model_sampler(cfg, resolve_path(path), torch.device("cpu"))
        x = torch.cat([sample(args.n, torch.Generator().manual_seed(s)).cpu() for s in args.seeds])
        sets[name] = x
        sets[f"{name}, quadrant-shuffled"] = quadrant_shuffle(x, g)
    result = {}
    for set_name, x in sets.items():
        result[set_name] = {}
        for inst_name, inst in instruments.items():
            found, d = inst.detect_km(x)
            result[set_name][inst_name] = {"detect_rate": float(found.mean()),
                                           "share_ge100": share_called(found, d, LARGE_KM),
                                           "share_ge150": share_called(found, d, HUGE_KM)}
        print(f"{set_name:34s} " + " | ".join(
            f"{k}: found {v['detect_rate']:.3f}, ≥ 100 km {v['share_ge100']:.3f}, ≥ 150 km {v['share_ge150']:.3f}"
            for k, v in result[set_name].items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "broken_rims.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
