"""Fine-tune the diffusion policy with RL: python -m scripts.finetune --cfg configs/default.yaml [--out DIR] [--resume]

Builds the reward artifact first when reward.artifact (default DIR/reward) is missing, then runs
rl.iterations of sample -> reward -> update. Writes DIR/metrics.csv, DIR/tb/, DIR/samples/,
DIR/checkpoints/step_N/ and the final model to DIR/model (a diffusers pipeline; LoRA also DIR/adapter).
"""
from __future__ import annotations

from rl.trainer import Finetuner
from utils import apply_threads, load_config, prepare_run_dir, run_main, script_parser


def main(argv: list[str] | None = None) -> None:
    args = script_parser(__doc__).parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    apply_threads(cfg)
    run_dir = prepare_run_dir(args.out, cfg, resume=args.resume)
    final = Finetuner(cfg, run_dir).run(resume=args.resume)
    print(f"saved the fine-tuned model to {final}")


if __name__ == "__main__":
    run_main(main)
