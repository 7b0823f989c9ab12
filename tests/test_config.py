"""Config loading: typed frozen tree, one-line errors naming key, file and closest key; --set."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import Config, ConfigError, config_to_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.name == path.stem


def test_config_is_frozen(tmp_path):
    cfg = load_config(_write(tmp_path, "seed: 3\n"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4  # type: ignore[misc]


def test_unknown_key_names_key_file_and_closest(tmp_path):
    p = _write(tmp_path, "pretrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(p) in msg and "'pretrain.lrr'" in msg and "did you mean 'pretrain.lr'" in msg


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'sampelr' \(did you mean 'sampler'\?\)"):
        load_config(_write(tmp_path, "sampelr:\n  eta: 1.0\n"))


@pytest.mark.parametrize("text, fragment", [
    ("seed: abc\n", "key 'seed' must be int, got 'abc'"),
    ("seed: 1.5\n", "key 'seed' must be int"),
    ("sampler:\n  eta: yes\n", "key 'sampler.eta' must be float"),
    ("sampler:\n  clip_sample: 1\n", "key 'sampler.clip_sample' must be bool"),
    ("data: 5\n", "key 'data' must be a mapping"),
])
def test_wrong_type(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("'", "'")):
        load_config(_write(tmp_path, text))


def test_bad_enum_value_lists_choices_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, "sampler:\n  logprob_reduction: maen\n"))
    msg = str(e.value)
    assert "'sampler.logprob_reduction' must be one of 'mean', 'sum'" in msg and "did you mean 'mean'" in msg

    with pytest.raises(ConfigError) as e:  # an element of a list of choices
        load_config(_write(tmp_path, "reward:\n  log: [ot, fdi]\n"))
    msg = str(e.value)
    assert "'reward.log[1]' must be one of 'mmd', 'mi'" in msg and "did you mean 'fid'" in msg
    assert load_config(_write(tmp_path, "reward:\n  log: [ot, fid]\n")).reward.log == ("ot", "fid")


@pytest.mark.parametrize("text, fragment", [
    ("pretrain:\n  lr: -0.001\n", "'pretrain.lr' must be > 0.0"),
    ("sampler:\n  sigma_floor: 0\n", "'sampler.sigma_floor' must be > 0.0"),
    ("pretrain:\n  ema_decay: 1.0\n", "'pretrain.ema_decay' must be < 1.0"),
    ("sampler:\n  num_steps: 0\n", "'sampler.num_steps' must be >= 1"),
])
def test_out_of_range(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(_write(tmp_path, text))


def test_int_is_accepted_for_float(tmp_path):
    assert load_config(_write(tmp_path, "sampler:\n  eta: 1\n")).sampler.eta == 1.0


def test_set_overrides_nested_values_with_type_checks(tmp_path):
    p = _write(tmp_path, "pretrain:\n  lr: 0.001\n")
    cfg = load_config(p, ["pretrain.lr=3e-4", "sampler.num_steps=20", "model.pretrained=null",
                          "pretrain.skew.small_fraction=0.5", "name=exp1"])
    assert cfg.pretrain.lr == 3e-4 and cfg.sampler.num_steps == 20 and cfg.model.pretrained is None
    assert cfg.pretrain.skew.small_fraction == 0.5 and cfg.name == "exp1"
    with pytest.raises(ConfigError, match=r"with --set.*'sampler.num_steps' must be int"):
        load_config(p, ["sampler.num_steps=ten"])
    with pytest.raises(ConfigError, match="did you mean 'sampler.eta'"):
        load_config(p, ["sampler.etaa=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["sampler.eta"])


def test_base_inheritance_and_override(tmp_path):
    _write(tmp_path, "seed: 7\nsampler:\n  eta: 0.5\n  num_steps: 20\n", "parent.yaml")
    cfg = load_config(_write(tmp_path, "base: parent.yaml\nsampler:\n  num_steps: 5\n"))
    assert (cfg.seed, cfg.sampler.eta, cfg.sampler.num_steps) == (7, 0.5, 5)


def test_the_dataclass_defaults_are_the_default_recipe():
    # one source of defaults: a YAML that does not start from configs/default.yaml still trains its recipe
    default = config_to_dict(load_config(ROOT / "configs" / "default.yaml"))
    assert default == {**config_to_dict(Config()), "name": "default"}


def test_a_mapping_given_with_set_merges_into_the_configured_one():
    # trpo.yaml turns the size and coverage credits off; a weights mapping on the command line must not bring
    # them back from the defaults (size 3, coverage 1), nor drop mi
    trpo = load_config(ROOT / "configs" / "trpo.yaml")
    assert (trpo.reward.weights.size, trpo.reward.weights.coverage) == (0.0, 0.0)
    cfg = load_config(ROOT / "configs" / "trpo.yaml", ["reward.weights={mmd: 2, ot: 0.5}", "rl.trpo={max_kl: 0.02}"])
    assert cfg.reward.weights == dataclasses.replace(trpo.reward.weights, mmd=2.0, ot=0.5)
    assert cfg.rl.trpo == dataclasses.replace(trpo.rl.trpo, max_kl=0.02)
    with pytest.raises(ConfigError, match="unknown key 'reward.weights.mdm'"):
        load_config(ROOT / "configs" / "trpo.yaml", ["reward.weights={mdm: 2}"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_save_load_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["pretrain.lr=0.01"])
    again = load_config(save_config(cfg, tmp_path / "resolved.yaml"))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


DEFAULTS = config_to_dict(Config())
"""The config's keys with their default values: a mapping per subtree."""
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["mean", "ppo", "folder", "3e-4", "-1", "[1, 3]", "null", "1 3"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
"""Any YAML value: scalars of every type (some close to valid ones), lists and mappings of them."""
ODD_YAML = ["&a [*a]", "a: &a {b: *a}", "? [a, b]\n: 1", "!!python/object/apply:os.system [ls]", "seed: !!binary aGk=",
            "name: 2024-01-01", "---\nseed: 1\n---\nseed: 2", "0", "\t", "\x00", "base: .", "base: [1]", "%TAG !",
            "a: " + "[" * 500 + "]" * 500, "sampler:\n  eta: .nan", "data:\n  channels: 2.0",
            r'"line\nbreaks\r\x85in a key": 1']
"""Documents a fuzzer rarely builds: aliases, tags, several documents, control characters, deep nesting."""


def _misspell(key: str, how: int) -> str:
    """A near miss of `key`: a letter dropped, doubled, upper-cased or a suffix added."""
    i = how % len(key)
    return [key[:i] + key[i + 1:], key[:i] + key[i] * 2 + key[i + 1:], key.upper(), key + "s"][how % 4]


@st.composite
def config_mappings(draw, tree: dict = DEFAULTS) -> dict:
    """Some keys of `tree`, one in five misspelled, each holding a mapping of its subtree's keys, its
    default value or any value."""
    out = {}
    for name in draw(st.lists(st.sampled_from(sorted(tree)), max_size=4, unique=True)):
        key = _misspell(name, draw(st.integers(0, 99))) if draw(st.integers(0, 4)) == 0 else name
        default = tree[name]
        subtree = config_mappings(default) if isinstance(default, dict) else st.just(default)
        out[key] = draw(subtree | VALUES)
    return out


CONFIG_FILES = ((config_mappings().map(lambda d: yaml.safe_dump(d, allow_unicode=True))
                 | st.text(st.characters(codec="utf-8"), max_size=200) | st.sampled_from(ODD_YAML)).map(str.encode)
                | st.binary(max_size=200))
"""Config file contents: YAML of real and misspelled keys, any text, odd YAML, any bytes."""


# tmp_path is shared by the examples on purpose: each writes the one file before loading it
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=CONFIG_FILES)
def test_any_file_loads_or_gives_a_one_line_config_error(tmp_path, content):
    path = tmp_path / "random.yaml"
    path.write_bytes(content)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        msg = str(e)
        assert msg.strip() and len(msg.splitlines()) == 1, msg
    else:
        assert isinstance(cfg, Config)
