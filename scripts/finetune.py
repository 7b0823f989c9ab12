"""Fine-tune the diffusion policy with RL: python -m scripts.finetune --cfg configs/default.yaml [--out DIR]
[--resume [--apply-changes]]

Builds the reward artifact first when reward.artifact (default DIR/reward) is missing, then runs
rl.iterations of sample -> reward -> update. Writes DIR/metrics.csv, DIR/tb/, DIR/samples/,
DIR/checkpoints/step_N/ and the final model to DIR/model (a diffusers pipeline; LoRA also DIR/adapter). A resume
refuses settings that differ from DIR/config.yaml unless --apply-changes (config.check_resume).

Several processes: accelerate launch --multi_gpu --num_processes N -m scripts.finetune --cfg ... (on a
machine without GPUs add --set device=cpu; rl.batch_size is the whole set, split evenly; rl/distributed.py).
"""
from __future__ import annotations

import os

from basics import run_main, script_parser
from config import check_finetune, load_config, prepare_run_dir


def main(argv: list[str] | None = None) -> None:
    args = script_parser(__doc__, resume=True).parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    check_finetune(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # the launcher's process count (rl.distributed)
    # the heavy modules (torch, diffusers) only now: a bad config or argument is reported before their import
    from rl import distributed
    from rl.trainer import Finetuner
    from utils import apply_threads

    apply_threads(cfg.num_threads)
    distributed.init(cpu=cfg.device == "cpu")
    run_dir = prepare_run_dir(args.out, cfg, resume=args.resume, write=distributed.is_main(),
                              apply_changes=args.apply_changes)
    distributed.barrier()
    final = Finetuner(cfg, run_dir).run(resume=args.resume)
    if distributed.is_main():
        print(f"saved the fine-tuned model to {final}")


if __name__ == "__main__":
    run_main(main)
