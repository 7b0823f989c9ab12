"""The package layering of docs/design.md, "Layout": basics ← utils ← config ← data ← ddpm ← reward ← rl ← evaluation ←
scripts/bench. Every import in the toolkit's source (function-level ones included) is read from the
AST: a module may import its own package or a layer to its left, never one to its right."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"basics": 0, "utils": 1, "config": 2, "data": 3, "ddpm": 4, "reward": 5, "rl": 6, "evaluation": 7, "scripts": 8,
          "bench": 8}


def imported_packages(path: Path) -> set[str]:
    """The top-level names of every project module `path` imports (absolute imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def source_files() -> list[Path]:
    files = [ROOT / "basics.py", ROOT / "utils.py", ROOT / "config.py"]
    for pkg in LAYERS:
        if (ROOT / pkg).is_dir():
            files += sorted((ROOT / pkg).rglob("*.py"))
    return files


def layer_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_no_module_imports_a_layer_above_it():
    upward = []
    for path in source_files():
        own = layer_of(path)
        for name in imported_packages(path):
            if LAYERS[name] > LAYERS[own]:
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert upward == []


def test_the_checker_sees_function_level_imports(tmp_path):
    # the rule must catch an upward import hidden inside a function, as reward/ once had
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from rl.build import model_sampler\n    import evaluation.run\n")
    assert imported_packages(f) == {"rl", "evaluation"}


@pytest.mark.parametrize("pkg", ["data", "ddpm", "reward", "rl", "evaluation"])
def test_every_package_is_importable_alone(pkg):
    __import__(pkg)


def nested_functions(path: Path) -> list[str]:
    """The functions and lambdas defined inside another function of `path` (closures, or places for one)."""
    found = []
    for outer in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found += [f"{outer.lineno}: {getattr(inner, 'name', 'lambda')}" for inner in ast.walk(outer)
                      if inner is not outer and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    return found


def test_one_ppo_iteration_runs_through_four_files_and_no_closures():
    # scripts/finetune.py -> rl/trainer.py (UPDATES) -> rl/ppo.py -> rl/update.py (two_pass) -> back to ppo_clip_loss
    from rl import ppo, trainer, update
    assert trainer.UPDATES["ppo"] is ppo.ppo_update and ppo.two_pass is update.two_pass
    assert ppo.ppo_clip_loss.__module__ == "rl.ppo" and issubclass(ppo.ClipStepLoss, update.StepLoss)
    assert "rl" in imported_packages(ROOT / "scripts" / "finetune.py")
    for rel in ("scripts/finetune.py", "rl/trainer.py", "rl/ppo.py", "rl/update.py"):
        assert nested_functions(ROOT / rel) == [], rel


def test_the_closure_finder_sees_a_closure(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f(k):\n    def g():\n        return k\n    return g, lambda: k\n")
    assert nested_functions(f) == ["1: g", "1: lambda"]


def test_library_functions_are_at_most_60_lines():
    """docs/design.md, "Layout": no function of the library or the scripts is longer than 60 lines (a longer one
    is split by job)."""
    long = []
    for path in source_files():
        if path.parts[len(ROOT.parts)] == "bench":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []
