"""Pretrain the base DDPM: python -m scripts.pretrain_ddpm --cfg configs/pretrain.yaml [--out DIR]
[--resume [--apply-changes]]"""
from __future__ import annotations

from basics import run_main, script_parser
from config import load_config, prepare_run_dir


def main(argv: list[str] | None = None) -> None:
    args = script_parser(__doc__, resume=True).parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    # the heavy modules (torch, diffusers) only now: a bad config or argument is reported before their import
    from ddpm.pretrain import pretrain
    from utils import apply_threads

    apply_threads(cfg.num_threads)
    run_dir = prepare_run_dir(args.out, cfg, resume=args.resume, stage="pretrain", apply_changes=args.apply_changes)
    final = pretrain(cfg, run_dir, resume=args.resume)
    print(f"saved the EMA model to {final}")


if __name__ == "__main__":
    run_main(main)
