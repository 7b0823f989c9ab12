"""The docs' commands against the code: every `python -m scripts.X` or `bench.X` the docs show exists, and every
flag they give it is one its argument parser knows."""
from __future__ import annotations

import importlib
import re

import pytest

from .conftest import ROOT

DOCS = ("README.md", "docs/design.md", "docs/results/README.md", "bench/README.md")
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
SPAN = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"python -m ((?:scripts|bench)\.\w+)(.*?)(?=python -m |&&|\||#|$)", re.S)


def commands(text: str) -> list[tuple[str, set[str]]]:
    """(module, flags) of every `python -m scripts.X|bench.X ...` in a markdown text: in code spans (which may
    wrap lines) and in fenced blocks, line by line."""
    blocks = FENCE.findall(text)
    snippets = [line for block in blocks for line in block.splitlines()] + SPAN.findall(FENCE.sub("", text))
    return [(m.group(1), {t.split("=")[0] for t in m.group(2).split() if t.startswith("--")})
            for s in snippets for m in COMMAND.finditer(s)]


def documented() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for doc in DOCS:
        for module, flags in commands((ROOT / doc).read_text(encoding="utf-8")):
            out.setdefault(module, set()).update(flags)
    return out


def test_the_extractor_reads_spans_fences_and_wrapped_lines():
    text = ("see `python -m scripts.eval --cfg c.yaml\n--model a=b --out d` and\n```sh\n"
            "python -m bench.loo --repeats 3   # note --not-a-flag\n```\n`python -m scripts.sample --n=4 && ls --all`")
    assert sorted(commands(text)) == [("bench.loo", {"--repeats"}), ("scripts.eval", {"--cfg", "--model", "--out"}),
                                      ("scripts.sample", {"--n"})]


@pytest.mark.parametrize("module, flags", sorted(documented().items()))
def test_every_documented_flag_is_in_its_scripts_parser(module, flags, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    known = set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    assert flags <= known, f"the docs give {module} {sorted(flags - known)}, which its parser does not know"


@pytest.mark.parametrize("script, required", [("eval", []), ("make_dataset", []), ("sample", ["--ckpt", "m"]),
                                              ("train_reward_model", [])])
def test_scripts_that_keep_no_checkpoint_refuse_resume(script, required, capsys):
    # --resume would be read and ignored: refused by the parser instead, before any work
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"scripts.{script}").main(["--cfg", "configs/smoke.yaml", *required, "--resume"])
    assert stop.value.code == 2 and "unrecognized arguments: --resume" in capsys.readouterr().err
