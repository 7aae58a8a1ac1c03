import dataclasses

import pytest

from evil_moe import paths
from evil_moe.config import ConfigError, RunConfig, from_dict, load_preset


@pytest.mark.parametrize("name", ["smoke", "cpu-demo", "qwen3-4b"])
def test_every_preset_loads(name):
    cfg = load_preset(name)
    assert cfg.preset == name
    assert cfg.group_size >= 2 and cfg.rank >= 1


def test_presets_are_what_the_design_says():
    assert load_preset("smoke").model == "tiny-random"
    assert load_preset("cpu-demo").model == "smollm2-135m"
    q = load_preset("qwen3-4b")
    assert (q.model, q.dataset, q.steps, q.prompts_per_step, q.group_size) == \
        ("Qwen/Qwen3-4B", "leetcode", 200, 16, 16)


def test_every_field_has_help():
    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help"), f.name
    assert "group_size" in RunConfig.describe()


def test_unknown_key_names_the_key_and_allowed_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'stpes'.*allowed keys: .*steps"):
        from_dict({"stpes": 3})


@pytest.mark.parametrize("key,value,pattern", [
    ("steps", "ten", r"'steps' must be int"),
    ("steps", 2.5, r"'steps' must be int"),
    ("steps", True, r"'steps' must be int"),
    ("lr", "fast", r"'lr' must be float"),
    ("allow_unisolated", 1, r"'allow_unisolated' must be bool"),
    ("tiers", 2, r"'tiers' must be a list of int"),
])
def test_wrong_type(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict({key: value})


@pytest.mark.parametrize("key,value,pattern", [
    ("steps", -1, r"'steps' must be >= 1, got -1"),
    ("rank", 0, r"'rank' must be >= 1, got 0"),
    ("group_size", 1, r"'group_size' must be >= 2, got 1"),
    ("lr", 0.0, r"'lr' must be > 0"),
    ("top_p", 1.5, r"'top_p' must be <= 1"),
    ("router_prior", 1.0, r"'router_prior' must be < 1, got 1.0"),
    ("router_prior", 0.0, r"'router_prior' must be > 0"),
    ("router_sharpness", 0.0, r"'router_sharpness' must be > 0"),
    ("arm", "moe", r"'arm' got 'moe'; allowed values: 'evil_moe', 'vanilla', 'haar', 'no_pin'"),
    ("hint", "x", r"allowed values: 'overwrite_tests'"),
    ("arms", ["evil_moe", "bogus"], r"'arms' got 'bogus'"),
    ("tiers", [], r"'tiers' must not be empty"),
])
def test_impossible_value(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict({key: value})


def test_int_is_accepted_for_float_and_converted():
    assert from_dict({"lr": 1}).lr == 1.0
    assert isinstance(from_dict({"lr": 1}).lr, float)


def test_bad_preset_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("steps: 0\n")
    with pytest.raises(ConfigError, match=r"bad.yml: key 'steps' must be >= 1"):
        load_preset(p)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; known presets: .*cpu-demo"):
        load_preset("nope")


def test_overrides_are_validated():
    cfg = load_preset("smoke", steps=5, arm="vanilla")
    assert (cfg.steps, cfg.arm) == (5, "vanilla")
    with pytest.raises(ConfigError, match="group_size"):
        load_preset("smoke", group_size=1)


def test_presets_live_in_notebooks_params():
    assert paths.PRESETS_DIR == paths.REPO_ROOT / "notebooks" / "params"
