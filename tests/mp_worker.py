"""Run by tests/test_multiprocess.py under `accelerate launch --cpu --num_processes 2`: fine-tune on
the given config, then record what each process holds (a hash of its weights) and check the gathered
reward against the single-process reward of the same images."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from config import load_config, prepare_run_dir
from rl import distributed
from rl.trainer import Finetuner


def weights_hash(policy) -> str:
    h = hashlib.sha256()
    for name, value in sorted(policy.trainable_state().items()):
        h.update(name.encode())
        h.update(value.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    cfg_path, out = sys.argv[1], Path(sys.argv[2])
    cfg = load_config(cfg_path, sys.argv[3:])
    torch.set_num_threads(1)
    distributed.init(cpu=True)
    run = prepare_run_dir(out, cfg, resume=False, write=distributed.is_main())
    distributed.barrier()
    ft = Finetuner(cfg, run)
    start = weights_hash(ft.policy)
    ft.run(resume=False)
    # the reward of the gathered set, as the trainer computes it, against one process scoring all images
    traj = ft.policy.sample(cfg.rl.batch_size // distributed.world_size(), generator=ft.generator)
    out_mp, _ = ft.score(traj)
    images = distributed.gather(traj.images)
    single = ft.reward(images).rewards if distributed.is_main() else None
    record = {"rank": distributed.rank(), "world": distributed.world_size(), "start": start,
              "end": weights_hash(ft.policy), "batch": traj.batch_size, "set": int(out_mp.rewards.shape[0]),
              "reward_max_abs_diff": (float((out_mp.rewards - single).abs().max()) if single is not None else None)}
    (out / f"rank_{distributed.rank()}.json").write_text(json.dumps(record))
    distributed.barrier()


if __name__ == "__main__":
    main()
