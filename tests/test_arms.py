"""The arms are defined once (evil_moe.arms); every other module reads them from there."""

import pytest

from evil_moe import arms, config, evaluate, grpo, plots


def test_each_arm_has_the_properties_of_its_design():
    a = arms.BY_NAME
    assert (a["evil_moe"].routed, a["evil_moe"].pinned, a["evil_moe"].start) == (
        True, True, "v_act")
    assert (a["haar"].routed, a["haar"].pinned, a["haar"].start) == (True, True, "haar")
    assert (a["no_pin"].routed, a["no_pin"].pinned, a["no_pin"].start) == (True, False, "v_act")
    assert (a["vanilla"].routed, a["vanilla"].routes, a["vanilla"].start) == (False, False, None)
    assert (a["oracle"].routed, a["oracle"].routes, a["oracle"].pinned) == (False, True, False)
    assert [n for n in arms.ARMS if arms.get(n).uses_labels] == ["oracle"]


def test_every_module_reads_the_one_definition():
    assert config.ARMS is arms.ARMS
    assert grpo.ROUTED_ARMS is arms.ROUTED_ARMS and grpo.PINNED_ARMS is arms.PINNED_ARMS
    assert evaluate.ROUTED_ARMS is arms.ROUTED_ARMS
    assert set(plots.ARM_COLORS) == set(arms.ARMS)
    field = {f.name: f for f in config.dataclasses.fields(config.RunConfig)}["arm"]
    assert field.metadata["choices"] == arms.ARMS
    assert "on purpose" in field.metadata["help"]             # the oracle says it uses labels


def test_display_order_puts_the_ceiling_first_and_the_control_last():
    assert arms.ordered(["vanilla", "evil_moe", "oracle", "haar"]) == [
        "oracle", "evil_moe", "haar", "vanilla"]
    assert arms.DISPLAY_ORDER[0] == "oracle" and arms.DISPLAY_ORDER[-1] == arms.CONTROL


@pytest.mark.parametrize("kwargs, match", [
    (dict(routed=False, pinned=True, start=None, uses_labels=False), "pin loss needs a router"),
    (dict(routed=True, pinned=False, start=None, uses_labels=False), "start direction"),
    (dict(routed=True, pinned=False, start="x", uses_labels=False), "unknown start"),
    (dict(routed=True, pinned=False, start="haar", uses_labels=True), "no learned router"),
])
def test_an_inconsistent_arm_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        arms.Arm("x", description="", color="k", **kwargs)


def test_unknown_arm_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown arm 'moe'; known arms: evil_moe, vanilla"):
        arms.get("moe")


def test_cpu_study_is_cpu_demo_with_every_arm_three_seeds_and_the_new_measurements():
    demo = config.load_preset("cpu-demo").to_dict()
    study = config.load_preset("cpu-study").to_dict()
    differ = {k for k in demo if demo[k] != study[k]}
    assert differ == {"preset", "arms", "seeds", "solve_split", "eval_deployed_off",
                      "expected_minutes"}     # each preset states its own measured budget
    assert study["arms"] == list(arms.DISPLAY_ORDER) and study["seeds"] == [0, 1, 2]
    assert (study["solve_split"], study["eval_deployed_off"]) == ("tier1", True)
    assert 1 not in study["tiers"]                             # tier 1 is held out of training
