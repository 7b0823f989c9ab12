"""scripts.eval end to end: the folder mode, the --cfg mode on configs/smoke.yaml (base vs a saved
"fine-tuned" pipeline, the ceiling row, realism logits, training curves), the self-contained HTML,
and its one-line errors."""
from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from config import load_config
from utils import save_images

from .conftest import ROOT, run_script, script_error

METRICS = ("fid", "kid_mean", "kid_std", "mmd", "precision", "recall", "density", "coverage", "vendi",
           "vendi_real", "mode_coverage")


class _Refs(HTMLParser):
    """Collects every src/href (and url(...) in inline styles) of an HTML document."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.tags = 0

    def handle_starttag(self, tag, attrs):
        self.tags += 1
        for k, v in attrs:
            if k in ("src", "href", "data", "poster", "srcset", "action") and v is not None:
                self.refs.append(v)
            if k == "style" and v and "url(" in v:
                self.refs.append(v)


def _check_self_contained(html_path: Path) -> int:
    """The HTML parses and references nothing outside itself; returns the number of embedded images."""
    text = html_path.read_text()
    parser = _Refs()
    parser.feed(text)
    parser.close()
    assert parser.tags > 10
    for ref in parser.refs:
        assert ref.startswith("data:") or ref.startswith("#"), f"external reference in report.html: {ref[:80]}"
    assert "url(" not in text.split("</style>")[0].split("<style>")[-1]  # no external CSS resources
    assert "http://" not in text and "https://" not in text
    return sum(r.startswith("data:image/png;base64,") for r in parser.refs)


def _check_metric_tree(per_extractor: dict, n_seeds: int):
    for m in METRICS:
        stat = per_extractor[m]
        assert set(stat) >= {"mean", "std", "values"} and len(stat["values"]) == n_seeds, (m, stat)


def test_folder_mode_end_to_end(tmp_path):
    from data.procedural import procedural_set

    real, gen = tmp_path / "real", tmp_path / "gen"
    save_images(procedural_set(14, size=24, channels=1, seed=0), real)
    noise = torch.rand(12, 3, 20, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1   # RGB, other size:
    # a mismatch scored only when asked (--allow-mismatch; the refusal is a row of tests/test_bad_input.py)
    save_images(noise, gen / "nested")
    out = tmp_path / "report"
    proc = run_script("scripts.eval", "--real", real, "--generated", gen, "--out", out,
                      "--features", "pixels", "random_cnn", "--allow-mismatch", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # the generated folder and the texture-only row (the real folder phase-scrambled), scored alike
    assert set(report["models"]) == {"generated", "texture_only"}
    for row in report["models"].values():
        assert set(row) == {"pixels", "random_cnn"}
        for ex in ("pixels", "random_cnn"):
            _check_metric_tree(row[ex], 1)
    assert set(report["texture_check"]["generated"]) == {"behind_texture"}
    assert set(report["detail"]["models"]) == {"generated", "texture_only"}
    assert (report["settings"]["n_real"], report["settings"]["n_generated"]) == (14, 12)
    # noise against craters in pixel space: far from the reference
    assert report["models"]["generated"]["pixels"]["kid_mean"]["mean"] > 0
    assert _check_self_contained(out / "report.html") == 5   # two grids, two t-SNE plots, the power spectrum
    page = (out / "report.html").read_text()  # every table in its own scroll box: none widens the page
    assert page.count("<table>") >= 3 and page.count('<div class="table"><table>') == page.count("<table>")
    md = (out / "report.md").read_text()
    assert "| generated |" in md and "| texture_only |" in md and "FID at small n" in md and "## Fine detail" in md


def _pipeline_copy(dst: Path) -> Path:
    """The shipped base model copied to `dst`, or a tiny random pipeline when it is not built yet."""
    from ddpm.pipeline import SHIPPED_MODEL, save_pipeline

    if (SHIPPED_MODEL / "unet" / "config.json").is_file():
        shutil.copytree(SHIPPED_MODEL, dst)
        return dst
    from ddpm.schedulers import make_train_scheduler
    from ddpm.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet("tiny", image_size=32, channels=1)
    return save_pipeline(unet, make_train_scheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"), dst)


def test_cfg_mode_on_smoke_end_to_end(tmp_path, smoke_cfg):
    from ddpm.pipeline import SHIPPED_MODEL
    from reward.artifact import build_reward_model, save_artifact
    from data.sources import load_image_set

    run = tmp_path / "run"
    # a reward artifact with a realism scorer (pixel features, one epoch: seconds) and a metrics.csv,
    # as a fine-tuning run leaves them
    overrides = ["reward.features.name=pixels", "reward.realism.epochs=1"]
    cfg = load_config(smoke_cfg, overrides)
    ref = load_image_set(cfg.data, "train").images
    fake = torch.rand(32, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    save_artifact(build_reward_model(cfg, reference_images=ref, fake_images=fake), run / "reward")
    run.mkdir(exist_ok=True)
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "reward_mean", "reward_std", "reward_ot", "value_ot", "kl", "clip_frac", "grad_norm",
                    "grad_norm_clipped", "time_sample_s", "time_reward_s", "time_update_s", "peak_mem_mb", "skipped"])
        for s in (1, 2):
            w.writerow([s, 0.1 * s, 1.0, 0.1, 2.0, 1e-4, 0.1, 3.0, 1.0, 1.0, 0.2, 2.0, 10, 0])
    finetuned = _pipeline_copy(tmp_path / "finetuned")
    args = ["--cfg", smoke_cfg, "--out", tmp_path / "eval", "--set", "eval.n=16", "--set", "eval.seeds=[0]",
            "--set", "eval.extractors=[pixels,random_cnn]", "--set", f"eval.run_dir={run}",
            *sum((["--set", o] for o in overrides), []), "--model", f"finetuned={finetuned}"]
    if not (SHIPPED_MODEL / "unet" / "config.json").is_file():
        args += ["--model", f"base={finetuned}"]
    proc = run_script("scripts.eval", *args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "eval"
    report = json.loads((out / "report.json").read_text())
    for stage in ("sampling base:", "metrics:", "figures:", *(["crater sizes:"] * ("sizes" in report))):
        assert stage in proc.stderr, stage  # a progress bar for each stage
    assert list(report["models"]) == ["base", "finetuned", "texture_only", "train_split"]
    for model, per in report["models"].items():
        assert set(per) == {"pixels", "random_cnn"}, model
        for ex in per:
            _check_metric_tree(per[ex], 1)
    s = report["settings"]
    assert (s["n_generated"], s["n_real"], s["seeds"]) == (16, 16, [0])
    assert set(report["realism_logit"]) == {"base", "finetuned", "texture_only", "heldout_real"}
    rv = report["realism_validation"]
    assert set(rv["sets"]) == {"real held-out", "phase-scrambled held-out", "smooth noise"}
    assert rv["sets"]["real held-out"]["n"] == 131 and 0.0 <= rv["sets"]["smooth noise"]["called_real"] <= 1.0
    # the same weights and the same seed give the same samples: identical rows
    assert report["models"]["base"]["pixels"] == report["models"]["finetuned"]["pixels"]
    # the ceiling (real vs real) beats a model on coverage in pixel space
    assert report["models"]["train_split"]["pixels"]["coverage"]["mean"] >= 0.5
    for f in ("samples_base.png", "samples_finetuned.png", "samples_heldout.png", "samples_texture_only.png",
              "tsne_pixels.png", "tsne_random_cnn.png", "curves_finetuned.png", "sizes_sfd.png", "spectrum.png",
              "largest_rims_heldout.png", "largest_arcs_finetuned.png", "largest_templates_base.png",
              "largest_templates_texture_only.png",
              "report.md", "report.html"):
        assert (out / f).is_file(), f
    # grids: held-out, 3 sets; t-SNE ×2; curves; SFD; spectrum; the largest craters by 3 instruments of
    # held-out, base, finetuned, texture_only, train_split
    assert _check_self_contained(out / "report.html") == 4 + 2 + 1 + 1 + 1 + 3 * 5
    # crater sizes: the detectors validated on the real held-out tiles, the craterless sets and broken rims, and
    # per model the size figures (identical samples, identical figures)
    sizes = report["sizes"]
    assert sizes["instruments"] == ["rims", "arcs", "templates"]
    for inst in ("rims", "arcs", "templates"):
        v = sizes["validation"][inst]
        assert set(v["sets"]) == {"real held-out", "phase-scrambled held-out", "smooth noise",
                                  "quadrant-shuffled held-out"}
        assert v["sets"]["real held-out"]["n"] == 131 and v["sets"]["real held-out"]["spearman"] > 0.7
        # the whole ring calls a crater's pieces a crater: the report says so; the others meet every goal
        missed = [goal for goal, ok in v["goals"].items() if not ok]
        assert missed == ([] if inst != "rims" else [g for g in v["goals"] if g.startswith("quadrant")]), missed
        assert 0.2 < sizes["heldout"][f"share_ge100_{inst}"] < 0.6
        for k in ("detect_rate", "share_ge100", "share_ge150", "w1_log10", "kl_hist"):
            stat = sizes["models"]["base"][f"{k}_{inst}"]
            assert set(stat) >= {"mean", "std", "values"} and len(stat["values"]) == 1, (k, stat)
        # texture carries no craters: 16 scrambled tiles have few detections, the real ones many
        assert sizes["models"]["texture_only"][f"detect_rate_{inst}"]["mean"] <= 0.25
        assert sizes["heldout"][f"detect_rate_{inst}"] >= (0.5 if inst == "arcs" else 0.6)
    assert set(sizes["models"]) == {"base", "finetuned", "texture_only", "train_split"}
    assert sizes["models"]["base"] == sizes["models"]["finetuned"]
    assert 0.2 < sizes["heldout"]["share_ge100_true"] < 0.6
    check = report["texture_check"]["finetuned"]
    assert set(check) == {"behind_texture", "wins", "shared", "own", "texture_only"} and check["wins"] == []
    md = (out / "report.md").read_text()
    assert "## Features: random_cnn" in md and "| train_split |" in md and "realism logit" in md
    assert "## Crater-size instruments: validation" in md and "| rims | smooth noise |" in md
    assert "## Realism scorer: validation" in md and "| phase-scrambled held-out | 131 |" in md
    assert "## Crater sizes" in md and "W1(log10 D)" in md and "held-out (catalogue)" in md
    assert "share ≥ 150 km (templates)" in md and "| texture_only |" in md and "## Fine detail" in md
    assert "finetuned beats the base model on no compared metric" in md


def test_eval_errors_are_one_line(tmp_path, smoke_cfg):
    # no fine-tuned model in the run directory and no --model: tells to run scripts.finetune first
    script_error(run_script("scripts.eval", "--cfg", smoke_cfg, "--set", f"eval.run_dir={tmp_path / 'none'}",
                               "--out", tmp_path / "e1", timeout=120),
                    "no fine-tuned model", "scripts.finetune", "--model", progress_bars=False)
    # folder mode: a missing folder, and a bad extractor name in the same call pattern
    (tmp_path / "real").mkdir()
    script_error(run_script("scripts.eval", "--real", tmp_path / "real", "--generated", tmp_path / "nope",
                               "--out", tmp_path / "e2", "--features", "pixles", timeout=120),
                    "unknown feature extractor 'pixles'", "did you mean 'pixels'", progress_bars=False)
    script_error(run_script("scripts.eval", "--real", tmp_path / "real", "--out", tmp_path / "e3", timeout=120),
                    "--generated", progress_bars=False)


def test_model_arguments_are_checked():
    from evaluation.run import parse_model_args, resolve_models
    from basics import CraterdiffError

    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    assert parse_model_args(["ppo=runs/a/model", "trpo = runs/b/model"]) == {"ppo": Path("runs/a/model"),
                                                                            "trpo": Path("runs/b/model")}
    for bad, msg in ((["ppo"], "NAME=PATH"), (["train_split=x"], "reference rows"), (["texture_only=x"], "reference rows"), (["a=x", "a=y"], "twice")):
        with pytest.raises(CraterdiffError, match=msg):
            parse_model_args(bad)
    missing = Path("/nonexistent/run")
    with pytest.raises(CraterdiffError, match="scripts.finetune"):
        resolve_models(cfg, missing)
    # with --model given, the absent default fine-tuned model is left out rather than an error
    specs = resolve_models(cfg, missing, extra={"ppo": Path("/x/model")})
    assert [s.name for s in specs] == ["base", "ppo"]
    assert [s.name for s in resolve_models(cfg, missing, only=["base"])] == ["base"]
    with pytest.raises(CraterdiffError, match="unknown model 'trpo'"):
        resolve_models(cfg, missing, only=["base", "trpo"])


def test_pool_sizes_draws_one_line_per_group_and_keeps_the_others():
    from evaluation.run import pool_sizes

    def fd(*d):  # (found, D): NaN is "no crater"
        d = np.array(d)
        return np.isfinite(d), d

    a = [fd(10.0, np.nan), fd(30.0)]
    b = [fd(40.0), fd(50.0, 60.0)]
    base = [fd(5.0), fd(6.0)]
    sizes = {"v_s0": a, "v_s1": b, "base": base}
    pooled = pool_sizes(sizes, {"v": ["v_s0", "v_s1"]})
    assert list(pooled) == ["v", "base"] and pooled["base"] is base
    found, d = pooled["v"][0]
    assert len(pooled["v"]) == 1 and found.tolist() == [True, False, True, True, True, True]
    assert sorted(d[found]) == [10.0, 30.0, 40.0, 50.0, 60.0]
    assert pool_sizes(sizes, None) == sizes
