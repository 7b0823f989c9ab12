"""bench.grid_duplicates: near-duplicate tiles counted in a grid image."""
import json

import numpy as np
import pytest
import torch

from bench.grid_duplicates import grid_tiles, largest_group, main
from utils import save_image_grid


def _grid(tmp_path, copies: int, distinct: int):
    g = torch.Generator().manual_seed(0)
    one = torch.rand(1, 1, 32, 32, generator=g) * 2 - 1
    others = torch.rand(distinct, 1, 32, 32, generator=g) * 2 - 1
    repeats = (one + 0.02 * torch.randn(copies, 1, 32, 32, generator=g)).clamp(-1, 1)  # near, not exact, copies
    return save_image_grid(torch.cat([repeats, others]), tmp_path / "grid.png", nrow=8, scale=2)


def test_counts_the_repeated_tile_and_nothing_among_distinct_ones(tmp_path):
    path = _grid(tmp_path, copies=5, distinct=11)
    tiles = grid_tiles(path, tile=64, pad=2)
    assert tiles.shape == (16, 64 * 64)  # two rows of 8
    assert largest_group(np.corrcoef(tiles), 0.9) == 5
    assert largest_group(np.corrcoef(tiles[5:]), 0.9) == 1


def test_script_writes_json_and_refuses_missing_grids(tmp_path, capsys):
    path = _grid(tmp_path, copies=3, distinct=5)
    main([str(path), "--out", str(tmp_path / "out")])
    got = json.loads((tmp_path / "out" / "grid_duplicates.json").read_text())
    assert got["grids"][str(path)] == {"tiles": 8, "largest_group": 3}
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope.png")])
    assert e.value.code == 2 and "no such grid image" in capsys.readouterr().err
