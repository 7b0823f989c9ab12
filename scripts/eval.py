"""Evaluate models against held-out craters and write a report (docs/design.md, "Evaluation").

    python -m scripts.eval --cfg CFG [--out DIR] [--set k=v] [--model NAME=PATH ...] [--models base finetuned ...]
        samples eval.n images per seed from the base model (model.pretrained), the run's fine-tuned
        model (<eval.run_dir or runs/<name>>/model) and every --model NAME=PATH, with the same seeds;
        scores them and the ceiling (train split vs held-out split) in every eval.extractors;
        writes DIR/report.json, report.md, report.html (self-contained) and the figures.
        DIR defaults to <run dir>/eval.

    python -m scripts.eval --real DIR --generated DIR --out DIR [--features NAME ...] [--cfg CFG]
        any two image folders, no model: one row. Folders whose images differ in size or channels are
        refused unless --allow-mismatch.

The logic lives in evaluation/run.py.
"""
from __future__ import annotations

from pathlib import Path

from basics import CraterdiffError, run_main, script_parser
from config import EvalConfig, load_config


def main(argv: list[str] | None = None) -> None:
    p = script_parser(__doc__, cfg_required=False,
                      out_help="report directory (default <run directory>/eval; required with --real/--generated)")
    p.add_argument("--model", dest="extra_models", action="append", default=[], metavar="NAME=PATH",
                   help="another saved pipeline to evaluate, e.g. --model trpo=runs/trpo/model (repeatable)")
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="evaluate only these models (base, finetuned, or --model names)")
    p.add_argument("--real", default=None, help="folder mode: real image folder")
    p.add_argument("--generated", default=None, help="folder mode: generated image folder")
    p.add_argument("--features", nargs="+", default=None, metavar="NAME",
                   help="folder mode: feature extractor(s) (default: the first of eval.extractors)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="folder mode: score folders whose images differ in size or channels (refused otherwise)")
    args = p.parse_args(argv)

    if args.real or args.generated:
        if not (args.real and args.generated):
            raise CraterdiffError("folder mode needs both --real DIR and --generated DIR")
        if not args.out:
            raise CraterdiffError("folder mode needs --out DIR for the report")
        if args.extra_models or args.models:
            raise CraterdiffError("--model/--models evaluate models with --cfg; folder mode takes only "
                                  "--real, --generated, --features, --allow-mismatch")
        if args.overrides and not args.cfg:
            raise CraterdiffError("--set needs --cfg (folder mode reads eval.* settings from the config)")
        cfg = load_config(args.cfg, args.overrides) if args.cfg else None
        # the heavy modules (torch, diffusers) only now: a bad config or argument is reported before their import
        from evaluation.run import evaluate_folders
        from utils import apply_threads
        if cfg is not None:
            apply_threads(cfg.num_threads)
        ev = cfg.eval if cfg else EvalConfig()
        report = evaluate_folders(Path(args.real), Path(args.generated), Path(args.out),
                                  features=args.features or ev.extractors[:1], ev=ev,
                                  device=cfg.device if cfg else "auto", seed=cfg.seed if cfg else 0,
                                  allow_mismatch=args.allow_mismatch)
        print(f"wrote {Path(args.out) / 'report.html'} ({report['settings']['n_generated']} generated vs "
              f"{report['settings']['n_real']} real images)")
        return

    if not args.cfg:
        raise CraterdiffError("pass --cfg CFG to evaluate models, or --real DIR --generated DIR --out DIR for two "
                          "image folders")
    if args.allow_mismatch:
        raise CraterdiffError("--allow-mismatch is for folder mode (--real, --generated); drop it with --cfg")
    if args.features:
        raise CraterdiffError("--features is for folder mode; with --cfg set eval.extractors, e.g. "
                              "--set eval.extractors=[efficientnet_lite0,random_cnn]")
    cfg = load_config(args.cfg, args.overrides)
    from evaluation.run import default_run_dir, evaluate_run, parse_model_args, resolve_models  # heavy: see above
    from utils import apply_threads
    apply_threads(cfg.num_threads)
    run_dir = default_run_dir(cfg)
    models = resolve_models(cfg, run_dir, extra=parse_model_args(args.extra_models), only=args.models)
    out = Path(args.out) if args.out else run_dir / "eval"
    report = evaluate_run(cfg, models, out=out, run_dir=run_dir)
    t = report["settings"]["timings_s"]["total_s"]
    print(f"wrote {out / 'report.html'} ({', '.join(s.name for s in models)} + {report['settings']['ceiling'].split(':')[0]}"
          f", {len(cfg.eval.seeds)} seeds, {t:.0f} s)")


if __name__ == "__main__":
    run_main(main)
