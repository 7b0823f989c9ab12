"""The size instruments on real and craterless tiles: each detector's validation table at several tile sizes, and the
template detector's whitening γ, beside the forced-argmax template matcher that it replaced.

    python -m bench.size_instruments --out DIR [--sizes 16 32 64] [--gammas 0 0.25 0.5 0.75 1]

For every tile size: each detector calibrated on the train tiles (`evaluation.sizes.build_instruments`) and validated
on the held-out tiles, their phase-scrambled copies and smooth noise (`validate_instrument`). At 32 px also: the
template detector at each whitening γ (its threshold recalibrated each time), and the forced argmax of the plain NCC
over the simple-bowl templates (the matcher before the detector: it calls every tile a crater). Writes
`DIR/size_instruments.json` and prints one line per row.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from data.datasets import load_mars_craters
from data.surrogates import craterless_sets
from evaluation.sizes import LARGE_KM, HUGE_KM, WINDOW_KM, SizeInstrument, build_instruments, validate_instrument
from reward import templates
from reward.templates import Detections, TemplateMatcher, calibrate_light, ncc, null_threshold, render_templates


class ForcedArgmax:
    """The template matcher before it became a detector: argmax of the plain NCC over the simple-bowl templates,
    found everywhere."""

    def __init__(self, azimuth_deg: float, elevation_deg: float):
        self.light = dict(azimuth_deg=azimuth_deg, elevation_deg=elevation_deg)

    def detect(self, images: torch.Tensor) -> Detections:
        t = render_templates(images.shape[-1], morphologies=templates.MORPHOLOGIES[:1], **self.light)[0]
        rho = ncc(images, t)
        log_d = torch.from_numpy(np.log10(templates.template_diameters()))[rho.argmax(1)]
        return Detections(torch.ones(len(images), dtype=torch.bool), log_d, rho.amax(1))


def _row(v: dict) -> str:
    real = v["sets"]["real held-out"]
    others = "  ".join(f"{k}: {r['share_ge100']:.3f}/{r['share_ge150']:.3f}" for k, r in v["sets"].items()
                       if k != "real held-out")
    return (f"real detected {real['detect_rate']:.3f}, detected share ≥ {LARGE_KM:.0f}/{HUGE_KM:.0f} km "
            f"{real['share_ge100_detected']:.3f}/{real['share_ge150_detected']:.3f} (catalogue "
            f"{real['catalogue_share_ge100']:.3f}/{real['catalogue_share_ge150']:.3f}), ρ {real['spearman']:.3f};  "
            f"{others};  goals {'met' if v['met'] else 'MISSED'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"sizes": {}, "whitening_32px": {}}
    for size in args.sizes:
        tr, rt = load_mars_craters(split="train", size=size)
        ho, rh = load_mars_craters(split="heldout", size=size)
        d_tr = np.array([r["diameter_km"] for r in rt])
        d_ho = np.array([r["diameter_km"] for r in rh])
        craterless = craterless_sets(ho)
        t0 = time.perf_counter()
        instruments = build_instruments(tr, d_tr)
        result["sizes"][size] = {"calibration_s": time.perf_counter() - t0}
        if size == 32:
            m = instruments["templates"].detector
            instruments["templates (forced argmax, before)"] = SizeInstrument(
                "forced", ForcedArgmax(m.azimuth_deg, m.elevation_deg), WINDOW_KM)
        for name, inst in instruments.items():
            t0 = time.perf_counter()
            v = validate_instrument(inst, ho, d_ho, craterless)
            v["validate_s"] = time.perf_counter() - t0
            result["sizes"][size][name] = v
            print(f"{size:3d} px  {name:34s} {_row(v)}")
        if size == 32:
            light = calibrate_light(tr)
            for gamma in args.gammas:
                m = TemplateMatcher(azimuth_deg=light[0], elevation_deg=light[1], gamma=gamma)
                m.threshold = null_threshold(m, tr)
                inst = SizeInstrument("templates", m)
                detected = inst.detect_km(ho)
                v = validate_instrument(inst, ho, d_ho, craterless, detected=detected)
                v["detect_rate_large"] = float(detected[0][d_ho >= LARGE_KM].mean())
                result["whitening_32px"][gamma] = v
                print(f" 32 px  templates γ = {gamma:<4}  large craters detected {v['detect_rate_large']:.3f};  "
                      f"{_row(v)}")
    (out / "size_instruments.json").write_text(json.dumps(result, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
