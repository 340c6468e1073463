import dataclasses
from pathlib import Path

import pytest

from keel.config import DemoConfig, EvalConfig, RLConfig, SFTConfig, from_dict, load_recipe, override
from keel.errors import KeelError

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(KeelError, match=r"unknown key 'group_sise'.*did you mean 'group_size'"):
        from_dict(RLConfig, {"group_sise": 4})


def test_nested_unknown_key_reports_its_path():
    with pytest.raises(KeelError, match=r"recipe\.rl: unknown key 'lrr'"):
        from_dict(DemoConfig, {"rl": {"lrr": 1e-3}})


@pytest.mark.parametrize("cls, data, message", [
    (RLConfig, {"group_size": 1}, "group_size must be >= 2"),
    (RLConfig, {"loss": "ppo"}, "unknown loss 'ppo'"),
    (RLConfig, {"top_p": 0}, "top_p must be in"),
    (RLConfig, {"temperature": 0}, "temperature must be > 0"),
    (RLConfig, {"eps_high": 1.5}, "eps_high must be in"),
    (SFTConfig, {"lr": -1}, "lr and grad_clip must be > 0"),
    (EvalConfig, {"k": 0}, "must be >= 1"),
    (RLConfig, {"steps": "many"}, "'many' is not a valid int"),
    (RLConfig, {"steps": 2.5}, "not a valid int"),
    (RLConfig, {"dynamic_sampling": "yes"}, "not a valid bool"),
])
def test_out_of_range_values_fail_with_a_message(cls, data, message):
    with pytest.raises(KeelError, match=message):
        from_dict(cls, data)


def test_yaml_scientific_notation_and_nested_sections(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: countdown\nrl:\n  lr: 3e-5\n  loss: dapo\nmodel:\n  layers: 2\n")
    cfg = load_recipe(path, DemoConfig)
    assert cfg.rl.lr == pytest.approx(3e-5) and cfg.rl.loss == "dapo" and cfg.model.layers == 2
    assert cfg.stage("rl").task == "countdown" and cfg.stage("sft").task == "countdown"


def test_bad_yaml_and_missing_recipe(tmp_path):
    with pytest.raises(KeelError, match="not found"):
        load_recipe(tmp_path / "nope.yaml", RLConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: [1, 2\n")
    with pytest.raises(KeelError, match="not valid YAML"):
        load_recipe(bad, DemoConfig)


def test_override_applies_flags_and_revalidates():
    cfg = override(RLConfig(), steps=5, loss=None)
    assert cfg.steps == 5 and cfg.loss == "grpo"
    with pytest.raises(KeelError, match="group_size"):
        override(cfg, group_size=1)


def test_every_recipe_loads():
    from keel.config import ExpertIterationConfig

    kinds = {"demo": DemoConfig, "expert_iteration": ExpertIterationConfig}
    recipes = sorted(RECIPES.glob("*.yaml"))
    assert len(recipes) >= 4, "recipes/ should hold ready-made runs"
    for path in recipes:
        load_recipe(path, kinds.get(path.stem, RLConfig))


def test_demo_recipe_is_the_embedded_default():
    assert load_recipe(RECIPES / "demo.yaml", DemoConfig) == DemoConfig()


def test_qwen3_recipe_loads_as_documented(tmp_path):
    from keel.config import LoraSpec

    cfg = load_recipe(RECIPES / "qwen3-0.6b.yaml", RLConfig)
    assert cfg.task.endswith(".jsonl") and cfg.loss == "grpo" and cfg.dtype == "bf16" and cfg.device == "auto"
    assert (cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens) == (8, 8, 1024)
    assert cfg.rollout_batch_size == 64 and cfg.micro_batch_tokens == 16384 and cfg.gradient_checkpointing
    assert cfg.lora is None
    on = tmp_path / "lora.yaml"  # the commented-out LoRA line, switched on, loads too
    on.write_text((RECIPES / "qwen3-0.6b.yaml").read_text().replace("# lora: {", "lora: {"))
    assert load_recipe(on, RLConfig).lora == LoraSpec(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RLConfig().steps = 3
