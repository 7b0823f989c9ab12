"""Build the frozen reward model: python -m scripts.train_reward_model --cfg CFG [--out RUN_DIR]

Writes the artifact to reward.artifact, or RUN_DIR/reward (default RUN_DIR: runs/<config name>):
reward.yaml, reference_features.npy, pca.npz, realism.safetensors. `reward.load(path)` rebuilds it.
"""
from __future__ import annotations

from basics import run_main, script_parser
from config import load_config, prepare_run_dir


def main(argv: list[str] | None = None) -> None:
    args = script_parser(__doc__).parse_args(argv)
    cfg = load_config(args.cfg, args.overrides)
    # the heavy modules (torch, diffusers) only now: a bad config or argument is reported before their import
    from reward.build import artifact_path
    from rl.build import build_reward_artifact
    from utils import apply_threads

    apply_threads(cfg.num_threads)
    run_dir = prepare_run_dir(args.out, cfg, resume=False, guard_checkpoints=False, config_name="config_reward.yaml")
    out = artifact_path(cfg, run_dir)
    model = build_reward_artifact(cfg, out)
    realism = model.info["realism"]
    extra = (f", realism held-out accuracy {realism['heldout_accuracy']:.3f} AUC {realism['heldout_auc']:.3f}"
             if realism.get("enabled") else "")
    print(f"saved the reward artifact to {out} ({model.extractor.name}, {model.reference.shape[1]}-d features of "
          f"{model.reference.shape[0]} reference images, bandwidth {model.bandwidth:.4g}{extra})")


if __name__ == "__main__":
    run_main(main)
