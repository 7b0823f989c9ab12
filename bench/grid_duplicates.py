"""Near-duplicate tiles in the reports' grids of largest detected craters.

A model can raise a size share by repeating one tile the detector calls large; the grid shows it, this counts it.
Each grid (`utils.image_grid` layout: square tiles, `pad` white pixels around each) is cut into its tiles; two tiles
are near-duplicates when the Pearson correlation of their pixels exceeds `threshold`, and the largest group is the
largest tile's count of near-duplicates plus itself.

    python -m bench.grid_duplicates docs/results/default_levers/largest_rims_*.png --out docs/results/grid_duplicates
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def grid_tiles(path: Path, *, tile: int, pad: int) -> np.ndarray:
    """The (N, tile·tile) gray tiles of a grid image, row by row; all-white (empty) slots left out."""
    a = np.asarray(Image.open(path).convert("L"), dtype=np.float64)  # (H, W)
    step = tile + pad
    rows, cols = (a.shape[0] - pad) // step, (a.shape[1] - pad) // step
    t = a[pad:pad + rows * step, pad:pad + cols * step].reshape(rows, step, cols, step)[:, :tile, :, :tile]
    t = t.transpose(0, 2, 1, 3).reshape(rows * cols, tile * tile)  # (rows·cols, tile·tile)
    return t[t.min(1) < 255]


def largest_group(r: np.ndarray, threshold: float) -> int:
    """max_i 1 + #{j ≠ i : R_ij > threshold} for a correlation matrix R (N, N): the most tiles that are
    near-duplicates of one tile."""
    above = np.atleast_2d(r) > threshold  # np.corrcoef of one tile is a scalar
    np.fill_diagonal(above, False)
    return int(above.sum(1).max()) + 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grids", nargs="+", type=Path, help="grid PNGs")
    p.add_argument("--tile", type=int, default=64, help="tile side in pixels (the reports' grids: 32 px × 2)")
    p.add_argument("--pad", type=int, default=2, help="white pixels between tiles")
    p.add_argument("--threshold", type=float, default=0.9, help="Pearson r above which two tiles are near-duplicates")
    p.add_argument("--out", type=Path, default=None, help="folder for grid_duplicates.json")
    args = p.parse_args(argv)
    missing = [str(g) for g in args.grids if not g.is_file()]
    if missing:
        p.error(f"no such grid image: {', '.join(missing)}")

    result = {}
    for g in args.grids:
        tiles = grid_tiles(g, tile=args.tile, pad=args.pad)
        result[str(g)] = {"tiles": len(tiles), "largest_group": largest_group(np.corrcoef(tiles), args.threshold)}
        print(f"{g}: {result[str(g)]['largest_group']} of {len(tiles)} tiles near-duplicates of one")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "grid_duplicates.json").write_text(json.dumps(
            {"threshold": args.threshold, "tile": args.tile, "pad": args.pad, "grids": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
