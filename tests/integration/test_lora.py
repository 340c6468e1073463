"""LoRA through peft: only adapters train, the KL reference is the base with adapters off, runs
resume bit-identically, and OUT/model is a plain HF directory with the adapters merged in."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from keel.config import LoraSpec, RLConfig, SFTConfig, from_dict, override
from keel.engine.sampler import completion_logprobs
from keel.errors import KeelError
from keel.models import add_lora, init_model, load_model, save_model, special_ids
from keel.resilience import checkpoint
from keel.rl.trainer import RLTrainer, rl
from keel.runlog import read_jsonl
from keel.tasks import get_task
from keel.train.loop import TIMING_KEYS, train_loop
from keel.train.sft import SFTTrainer, completion_loss, encode_traces, pack, sft
from keel.train.stage import train_stage

ROOT = Path(__file__).resolve().parents[2]
TASK = {"digits": 2}
LORA = LoraSpec(r=8)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Qwen3's per layer
RL_RECIPE = """task: arithmetic
task_options: {digits: 2}
steps: 6
prompts_per_step: 4
group_size: 4
max_new_tokens: 20
updates_per_batch: 2
beta: 0.01
lr: 3.0e-3
lora: {r: 8, dropout: 0.1}
resilience: {checkpoint_every: 2}
"""
SFT_RECIPE = """task: arithmetic
task_options: {digits: 3}
examples: 300
steps: 8
batch_tokens: 512
lora: {r: 8, dropout: 0.1}
resilience: {checkpoint_every: 2}
"""


def keel(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "keel", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """A tiny Qwen3 fully SFT'd on 2-digit sums, enough that RL rewards vary (RL steps update)."""
    root = tmp_path_factory.mktemp("base")
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
    sft(model, tok, SFTConfig(task_options=TASK, examples=500, steps=80, batch_tokens=2048, device="cpu"), root / "sft")
    save_model(model, tok, root / "model")
    (root / "rl.yaml").write_text(RL_RECIPE)
    (root / "sft.yaml").write_text(SFT_RECIPE)
    return root


def rl_cfg(**changes):
    return RLConfig(**{**dict(task_options=TASK, steps=2, prompts_per_step=4, group_size=4, max_new_tokens=20,
                              beta=0.01, lr=3e-3, seed=5, device="cpu", lora=LORA), **changes})


def heldout_loss(model, tok, options: dict, n: int = 100) -> float:
    """Completion cross-entropy on the task's test split (never trained on), one packed forward."""
    pairs = encode_traces(tok, get_task("arithmetic", **options).examples("test", n, seed=0))
    batch = pack(pairs, 4 * max(len(p) + len(c) for p, c in pairs), special_ids(tok)[1])
    with torch.no_grad():
        return completion_loss(model.eval(), batch)[0].item()


# ----------------------------------------------------------------------------- config


def test_lora_section_loads_from_yaml_with_defaults_and_validation():
    cfg = from_dict(RLConfig, yaml.safe_load("lora: {r: 8}"))
    assert cfg.lora == LoraSpec(r=8, alpha=32.0, dropout=0.0, target_modules="all-linear")
    assert from_dict(SFTConfig, yaml.safe_load("lora: {}")).lora == LoraSpec()
    assert from_dict(SFTConfig, yaml.safe_load("lora:")).lora is None and SFTConfig().lora is None
    listed = from_dict(SFTConfig, yaml.safe_load("lora: {target_modules: [q_proj, v_proj]}")).lora
    assert listed.target_modules == ("q_proj", "v_proj")
    assert override(cfg, steps=3).lora == cfg.lora  # CLI flags keep the section
    with pytest.raises(KeelError, match=r"recipe\.lora: unknown key 'rank'"):
        from_dict(RLConfig, {"lora": {"rank": 8}})
    for bad, message in [({"r": 0}, "r must be"), ({"alpha": 0}, "alpha must be"), ({"dropout": 1}, "dropout"),
                         ({"target_modules": []}, "target_modules"), ({"r": 2.5}, "not a valid int")]:
        with pytest.raises(KeelError, match=message):
            from_dict(SFTConfig, {"lora": bad})


# ----------------------------------------------------------------------------- what trains


@pytest.mark.parametrize("target, per_layer", [("all-linear", LINEAR), (("q_proj", "v_proj"), ("q_proj", "v_proj"))])
def test_only_adapters_require_grad_and_only_they_are_in_the_optimizer(base, target, per_layer):
    model, tok = load_model(base / "model")
    spec = LoraSpec(r=4, target_modules=target)
    for trainer in (SFTTrainer(copy.deepcopy(model), tok, SFTConfig(task_options=TASK, examples=50, lora=spec, device="cpu")),
                    RLTrainer(copy.deepcopy(model), tok, rl_cfg(lora=spec))):
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert trainable == {f"model.layers.{i}.{'self_attn' if m in LINEAR[:4] else 'mlp'}.{m}.lora_{ab}.default.weight"
                             for i in range(2) for m in per_layer for ab in "AB"}
        in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert in_optimizer == {id(p) for p in trainer.model.parameters() if p.requires_grad}
        assert trainer.sync.params and all(p.requires_grad for p in trainer.sync.params)
    assert trainer.ref is None  # beta > 0, yet no second copy of the model


def test_reference_is_the_base_model_with_adapters_off(base):
    """The KL reference equals the untouched base model bit for bit, after the adapters moved;
    the first step's KL is exactly 0 (B starts at zero), later ones are not."""
    model, tok = load_model(base / "model")
    frozen = copy.deepcopy(model).eval()
    trainer = RLTrainer(model, tok, rl_cfg(steps=3))
    rows = [trainer.step() for _ in range(3)]
    assert rows[0]["kl"] == 0.0 and rows[2]["kl"] > 0
    batch = trainer.collect()
    trainer.model.train()
    ref = trainer.reference_logprobs(batch)
    assert trainer.model.training  # the policy's mode is left as it was
    with torch.no_grad():
        expected, mask, _ = completion_logprobs(frozen, batch.prompts, batch.completions, pad_id=trainer.pad_id,
                                                temperature=trainer.cfg.temperature)
        policy, _, _ = completion_logprobs(trainer.model.eval(), batch.prompts, batch.completions,
                                           pad_id=trainer.pad_id, temperature=trainer.cfg.temperature)
    assert torch.equal(ref * mask, expected * mask)
    assert ((policy - expected).abs() * mask).max() > 1e-4  # the adapters do change the policy


# ----------------------------------------------------------------------------- learning


def test_lora_sft_lowers_held_out_loss_on_a_new_skill(base, tmp_path):
    """Adapters on a model that only knows 2-digit sums learn 3-digit ones: the test-split
    completion loss falls by more than a fifth (1.29 -> about 0.9) with the base untouched."""
    model, tok = load_model(base / "model")
    options = {"digits": 3}
    before = heldout_loss(model, tok, options)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SFTConfig(task_options=options, examples=500, steps=60, batch_tokens=2048, lr=3e-3, warmup=5,
                    lora=LORA, seed=1, device="cpu")
    trainer = SFTTrainer(model, tok, cfg)
    train_loop(trainer, tmp_path, cfg.resilience, cfg.steps, "sft")
    after = heldout_loss(trainer.model, tok, options)
    assert after < 0.8 * before, (before, after)
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_weights[name.replace(".base_layer", "")]), name


def test_lora_rl_steps_change_only_adapters(base, tmp_path):
    model, tok = load_model(base / "model")
    trainer = RLTrainer(model, tok, rl_cfg(updates_per_batch=2))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    rows = train_loop(trainer, tmp_path, trainer.cfg.resilience, 2, "rl")
    assert all(r["grad_norm"] > 0 and "skipped" not in r for r in rows)
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    adapters = {n for n, p in after.items() if p.requires_grad}
    assert changed and changed <= adapters
    assert {n for n in changed if "lora_B" in n} == {n for n in adapters if "lora_B" in n}  # every B moved


# ----------------------------------------------------------------------------- checkpoints


def test_lora_checkpoint_holds_adapters_and_their_moments_only(base, tmp_path):
    model, tok = load_model(base / "model")
    a = RLTrainer(model, tok, rl_cfg(updates_per_batch=2))
    a.step()
    tensors, meta = a.state()
    adapters = {n for n, p in a.model.named_parameters() if p.requires_grad}
    assert tensors.keys() == {"model", "optimizer", "rng"}  # no "ref": there is no copy
    assert set(tensors["model"]) == adapters
    slots = {}  # optimizer tensors "<param index>.<slot>": AdamW's step, exp_avg, exp_avg_sq per adapter
    for key in tensors["optimizer"]:
        index, _, slot = key.partition(".")
        slots.setdefault(slot, set()).add(int(index))
    assert slots == {s: set(range(len(adapters))) for s in ("step", "exp_avg", "exp_avg_sq")}
    path = checkpoint.write(tmp_path, a.step_idx, checkpoint.flatten(tensors), {"trainer": meta})
    saved, state = checkpoint.read(path)
    b = RLTrainer(load_model(base / "model")[0], tok, rl_cfg(updates_per_batch=2))
    b.load_state(saved, state["trainer"])
    for name, p in b.model.named_parameters():
        assert torch.equal(p, dict(a.model.named_parameters())[name]), name
    ra, rb = a.step(), b.step()
    assert {k: v for k, v in ra.items() if k not in TIMING_KEYS} == {k: v for k, v in rb.items() if k not in TIMING_KEYS}

    other, _ = init_model("qwen3", layers=2, hidden=64, seed=1)  # other base weights, same shapes
    with pytest.raises(KeelError, match="other base weights"):
        RLTrainer(other, tok, rl_cfg()).load_state(saved, state["trainer"])
    with pytest.raises(KeelError, match="written by a run with lora"):
        RLTrainer(load_model(base / "model")[0], tok, rl_cfg(lora=None)).load_state(saved, state["trainer"])


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def same_tensors(a: Path, b: Path):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("stage, kills", [("rl", (3, 5)), ("sft", (3, 6))])
def test_killed_and_resumed_lora_run_is_bit_identical(base, tmp_path, stage, kills):
    recipe = base / f"{stage}.yaml"
    clean = keel(stage, "--model", base / "model", "--out", tmp_path / "clean", "--recipe", recipe)
    assert clean.returncode == 0, clean.stderr
    spec = ",".join(f"kill@step={k}" for k in kills)
    killed = keel(stage, "--model", base / "model", "--out", tmp_path / "killed", "--recipe", recipe,
                  "--inject", spec, "--max-restarts", "5")
    assert killed.returncode == 0, killed.stderr
    events = read_jsonl(tmp_path / "killed" / "events.jsonl")
    assert [e["exit_code"] for e in events if e["event"] == "restart"] == [-9] * len(kills)
    assert sum(e["event"] == "resume" for e in events) == len(kills)
    for run in ("clean", "killed"):  # checkpoints hold the adapters, not the base weights
        newest = checkpoint.listing(tmp_path / run / "checkpoints")[0]
        names = [k for k in load_file(newest / "tensors.safetensors") if k.startswith("model/")]
        assert names and all(".lora_" in k for k in names)
    same_tensors(tmp_path / "clean" / "model" / "model.safetensors", tmp_path / "killed" / "model" / "model.safetensors")
    same_tensors(tmp_path / "clean" / "adapter" / "adapter_model.safetensors",
                 tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    ra, rb = comparable(read_jsonl(tmp_path / "clean" / "metrics.jsonl")), comparable(read_jsonl(tmp_path / "killed" / "metrics.jsonl"))
    assert len(ra) == len(rb) == yaml.safe_load(recipe.read_text())["steps"] and ra == rb


# ----------------------------------------------------------------------------- the stage's output


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft asks transformers' old name
def test_out_model_is_base_plus_merged_adapter_and_loads_without_peft(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = rl_cfg(steps=2, updates_per_batch=2)
    assert train_stage(rl, cfg, base / "model", out) == out / "model"
    assert not (out / "model" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert load_file(out / "model" / "model.safetensors").keys() == load_file(base / "model" / "model.safetensors").keys()

    ids = torch.tensor([[5, 17, 9, 23, 40, 3, 11, 60, 2, 8]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base / "model").eval()
        base_logits = plain(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(plain, out / "adapter").eval()(input_ids=ids).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter is not a no-op
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=0), (merged - adapted).abs().max()

    # transformers alone (peft unimportable) loads OUT/model
    code = ("import sys; sys.modules['peft'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out / 'model')!r})\n"
            "print(type(m).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.strip().endswith("Qwen3ForCausalLM"), r.stderr
