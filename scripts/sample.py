"""Sample a saved DDPM: python -m scripts.sample --ckpt MODEL_DIR --n 64 --out DIR [--cfg CFG]

Writes DIR/00000.png ... as each batch is drawn, and DIR/grid.png of the first 64; refuses an --n whose PNG files
would not fit on the disk. MODEL_DIR is a saved pipeline (e.g. ddpm/pretrained/mars32,
runs/<name>/model) or a pretraining checkpoint (runs/<name>/checkpoints/step_N, which holds `ema/`).
The sampler settings (steps, eta, clipping) come from --cfg (default: configs/default.yaml), except that a fine-tuned
model's steps, eta and clipping are those it was trained with (its sampler.json and scheduler) unless --set gives them.
"""
from __future__ import annotations

from pathlib import Path

from basics import (PROJECT_ROOT, CraterdiffError, check_free_space, ensure_writable_dir, png_bytes_at_most, run_main,
                    script_parser)
from config import MAX_SEED, load_config

GRID = 64
"""Images in grid.png (the first drawn)."""


def main(argv: list[str] | None = None) -> None:
    p = script_parser(__doc__, cfg_required=False, out_help="where the PNGs and grid.png go (default runs/samples)")
    p.add_argument("--ckpt", required=True, help="saved model directory or pretraining checkpoint")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    args = p.parse_args(argv)
    if args.n < 1:
        raise CraterdiffError(f"--n must be at least 1, got {args.n}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise CraterdiffError(f"--seed must be 0 to {MAX_SEED}, got {args.seed}")
    cfg_path = args.cfg or PROJECT_ROOT / "configs" / "default.yaml"
    cfg = load_config(cfg_path, args.overrides)
    out = ensure_writable_dir(Path(args.out) if args.out else PROJECT_ROOT / "runs" / "samples", "--out")
    # the heavy modules (torch, diffusers) only now: a bad config or argument is reported before their import
    import torch

    from ddpm.pipeline import load_pipeline, load_step_scales, trained_sampler_overrides
    from ddpm.sampling import model_image_batches
    from utils import apply_threads, resolve_device, save_image_grid, save_images, seed_everything

    apply_threads(cfg.num_threads)
    ckpt = Path(args.ckpt)
    model_dir = ckpt / "ema" if (ckpt / "ema" / "unet").is_dir() else ckpt
    unet, scheduler = load_pipeline(model_dir)
    c, size = unet.config.in_channels, unet.config.sample_size
    check_free_space(out, args.n * png_bytes_at_most(c, size, size), f"--n {args.n} images of {c}x{size}x{size}",
                     "lower --n or free space")
    device = resolve_device(cfg.device)
    unet.to(device).eval()
    # a fine-tuned model's own chain, unless --set says otherwise (later overrides win)
    s = load_config(cfg_path, [*trained_sampler_overrides(model_dir, scheduler.config), *args.overrides]).sampler
    gen = seed_everything(cfg.seed if args.seed is None else args.seed)
    written, first = 0, []
    for batch in model_image_batches(unet, scheduler.config, s, n=args.n, generator=gen, device=device, progress=True,
                                     step_scales=load_step_scales(model_dir, s.num_steps)):
        save_images(batch, out, start=written)  # each batch on disk as it is drawn: memory stays one batch
        if written < GRID:
            first.append(batch[:GRID - written])
        written += batch.shape[0]
    grid = save_image_grid(torch.cat(first), out / "grid.png", scale=2)
    print(f"wrote {args.n} samples and {grid} ({c}x{size}x{size}, {s.num_steps} DDIM steps, eta={s.eta})")


if __name__ == "__main__":
    run_main(main)
