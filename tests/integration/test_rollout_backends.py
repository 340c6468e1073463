"""RL rollouts sampled on another backend (RLConfig.rollout): the weights reach the sampler every
step, the trainer corrects for the mismatch, a torch fp32 sampler changes nothing, runs learn and
resume exactly."""

import copy
import dataclasses
import shutil
import statistics
import sys

import pytest
import torch

from keel.cli import main
from keel.completions import complete
from keel.config import LoraSpec, ResilienceConfig, RLConfig, RolloutConfig
from keel.engine.backends import OrtBackend, rollout_section
from keel.engine.sampler import SamplingParams
from keel.models import save_model
from keel.resilience import checkpoint
from keel.rl.trainer import RLTrainer, rl
from keel.runlog import read_jsonl
from keel.tasks import get_task
from keel.train.loop import TIMING_KEYS, train_loop

TASK = {"digits": 2}
# A run that learns in seconds: the held-out reward (correct + format of samples) rises.
LEARN = dict(steps=40, prompts_per_step=4, updates_per_batch=1, beta=0.0, format_weight=1.0)
NEW_KEYS = {"weight_sync_s", "mismatch_kl", "mismatch_k3", "correction_share", "ess"}
INT8_LOGIT_TOLERANCE = 0.05  # max |logit gap| of the int8 sampler to the fp32 trainer on the tiny model (measured 0.014)


def cfg(**changes) -> RLConfig:
    base = RLConfig(task_options=TASK, steps=3, prompts_per_step=2, group_size=4, max_new_tokens=16,
                    updates_per_batch=2, beta=0.01, lr=1e-3, seed=3)
    return dataclasses.replace(base, **changes)


def comparable(rows, drop=frozenset()):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS | drop} for r in rows]


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def logits_gap(trainer) -> float:
    """Max |logit difference| between the trainer's model and its sampler on one prompt."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    mask, pos = torch.ones_like(ids), torch.arange(7)[None]
    with torch.no_grad():
        want = trainer.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    got, _ = trainer.sampler.forward(ids, mask, pos, trainer.sampler.empty_past(1))
    return float((want - got).abs().max())


def test_torch_fp32_sampler_is_bit_identical_to_the_default_path(sft_model, tmp_path):
    model, tok = sft_model
    default, backend = copy.deepcopy(model), copy.deepcopy(model)
    rl(default, tok, cfg(), tmp_path / "default")
    rl(backend, tok, cfg(rollout=RolloutConfig(backend="torch", device="cpu", dtype="fp32")), tmp_path / "backend")
    a, b = read_jsonl(tmp_path / "default" / "metrics.jsonl"), read_jsonl(tmp_path / "backend" / "metrics.jsonl")
    assert all(NEW_KEYS <= set(row) for row in b) and not any(NEW_KEYS & set(row) for row in a)
    assert comparable(a) == comparable(b, NEW_KEYS)
    assert same_weights(default, backend) and not same_weights(default, model)  # it trained, identically
    # The copy runs the trainer's own sampling code on the same weights: auto picks no correction
    # (every weight exactly 1) and the sampler's log-probs match the trainer's to float rounding.
    assert all(row["ess"] == 1.0 and row["correction_share"] == 0.0 and abs(row["mismatch_kl"]) < 1e-6 for row in b)
    assert RLTrainer(copy.deepcopy(model), tok, cfg(rollout=RolloutConfig())).correction == "none"


def test_weights_reach_the_sampler_every_step(sft_model):
    model, tok = sft_model
    for rollout, tolerance in [(RolloutConfig(dtype="fp32"), 0.0), (RolloutConfig(dtype="bf16"), 0.1)]:
        trainer = RLTrainer(copy.deepcopy(model), tok, cfg(rollout=rollout))
        assert trainer.correction == ("none" if rollout.dtype == "fp32" else "tis")
        for _ in range(2):
            row = trainer.step()
            assert row["weight_sync_s"] >= 0 and row["grad_norm"] > 0
        stale = logits_gap(trainer)  # the update since the last sync moved the trainer away
        trainer.sync_sampler()
        assert logits_gap(trainer) <= tolerance < stale, (rollout, stale)
        if rollout.dtype == "fp32":
            assert same_weights(trainer.model, trainer.sampler.model)


def test_lora_samplers_get_the_merged_weights(sft_model, tmp_path):
    """Under LoRA the sampler is the plain model with the adapters merged in, and every sync gives
    it the merged weights (W + alpha / r * B @ A, by peft) under the base model's names: after two
    steps of an RL run the torch sampler's logits are the adapted trainer's to fp32 rounding, the
    fp32 ONNX graph's to its tolerance; the trainer keeps its unmerged adapters and frozen base."""
    model, tok = sft_model
    for rollout, tolerance in [(RolloutConfig(), 1e-5), (RolloutConfig(backend="onnxruntime"), 1e-4)]:
        trainer = RLTrainer(copy.deepcopy(model), tok, cfg(lora=LoraSpec(r=4), rollout=rollout))
        assert trainer.correction == "tis"  # merged weights: the same function, other rounding
        base = {k: v.clone() for k, v in trainer.model.state_dict().items() if "base_layer" in k}
        rows = train_loop(trainer, tmp_path / rollout.backend, ResilienceConfig(), 2, "rl")
        assert all(r["weight_sync_s"] > 0 and r["grad_norm"] > 0 and "mismatch_kl" in r for r in rows)
        stale = logits_gap(trainer)  # the adapters moved since the last sync
        trainer.sync_sampler()
        assert logits_gap(trainer) <= tolerance < stale, (rollout, stale)
        assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in base.items())
        if rollout.backend == "torch":
            assert trainer.sampler.model.state_dict().keys() == model.state_dict().keys()


def test_a_sharded_trainer_gathers_once_a_step_and_evaluates_the_trainers_weights(sft_model, tmp_path, monkeypatch):
    """Under fsdp, evaluate_every (rank 0 alone) cannot run the sharded model: after a step whose
    evaluation is due every rank gathers the weights (`full_state`) for its sampler, and the next
    step's rollouts reuse them, so a run gathers once a step (and once before its first). Rank 0
    evaluates the gathered weights: in the torch fp32 copy, or with the onnxruntime sampler in a
    plain torch model made of them, which scores what the trainer's own model does."""
    import keel.rl.trainer as trainer_module

    model, tok = sft_model
    gathers, evaluated, evaluate = [], [], trainer_module.evaluate
    monkeypatch.setattr(trainer_module, "full_state", lambda m: gathers.append(1) or m.state_dict())
    monkeypatch.setattr(trainer_module, "evaluate", lambda m, *a, **k: evaluated.append(m) or evaluate(m, *a, **k))
    for rollout in (RolloutConfig(), RolloutConfig(backend="onnxruntime")):
        trainer = RLTrainer(copy.deepcopy(model), tok, cfg(steps=2, eval_every=1, eval_n=4, rollout=rollout))
        trainer.sharded = True  # one process standing in for a rank of a sharded run (fsdp: tests/distributed)
        gathers.clear()
        rows = train_loop(trainer, tmp_path / rollout.backend, ResilienceConfig(), 2, "rl",
                          after_step=lambda row: trainer.evaluate_every(row, None))
        assert len(gathers) == 1 + 2  # was 2 a step: before the rollouts, and again for the evaluation
        assert all(row["weight_sync_s"] > 0 and "test_pass@1" in row for row in rows)
        assert isinstance(evaluated[-1], torch.nn.Module) and evaluated[-1] is not trainer.model
        assert same_weights(evaluated[-1], trainer.model) and trainer.eval_model is None


def test_rl_with_the_onnxruntime_sampler_learns_and_follows_training_without_re_export(sft_model):
    model, tok = sft_model
    trainer = RLTrainer(copy.deepcopy(model), tok, cfg(**LEARN, rollout=RolloutConfig(backend="onnxruntime")))
    assert isinstance(trainer.sampler, OrtBackend) and trainer.correction == "tis"
    graph = trainer.sampler.proto
    rows = [trainer.step() for _ in range(trainer.cfg.steps)]
    assert trainer.sampler.proto is graph  # exported once: every sync opens a session over the same graph
    stale = logits_gap(trainer)
    trainer.sync_sampler()
    assert logits_gap(trainer) < 1e-4 < stale
    before, after = held_out_reward(model, tok), held_out_reward(trainer.model, tok)
    assert after >= before + 0.15, (before, after)
    for row in rows:  # an fp32 graph against fp32 torch: the mismatch is float rounding
        assert abs(row["mismatch_kl"]) < 1e-5 and 0 <= row["mismatch_k3"] < 1e-6 and row["ess"] > 0.99999
        assert row["correction_share"] == 0.0 and row["weight_sync_s"] >= 0


def logits(backend, ids) -> torch.Tensor:
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    return backend.forward(ids, mask, pos, backend.empty_past(1))[0]


def test_int8_sampler_gets_the_weights_quantized_as_onnxruntime_quantizes_them(sft_model):
    """After k optimizer steps and a sync, the int8 sampler (fed weights re-quantized in numpy) computes
    exactly what ONNX Runtime's own quantize_dynamic makes of the trainer's weights, and what the
    trainer computes to int8's tolerance."""
    model, tok = sft_model
    trainer = RLTrainer(copy.deepcopy(model), tok, cfg(rollout=RolloutConfig(backend="onnxruntime", dtype="int8")))
    assert trainer.sampler.name == "onnxruntime:cpu:int8" and trainer.correction == "tis"
    graph = trainer.sampler.proto
    for _ in range(2):
        trainer.step()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    fresh = OrtBackend.from_model(trainer.model, dtype="int8")  # the tool quantizes today's weights
    assert not torch.equal(logits(trainer.sampler, ids), logits(fresh, ids))  # stale: the last update since
    trainer.sync_sampler()
    assert torch.equal(logits(trainer.sampler, ids), logits(fresh, ids))
    assert trainer.sampler.proto is graph  # never re-exported nor re-quantized by the tool
    assert 1e-4 < logits_gap(trainer) < INT8_LOGIT_TOLERANCE


def test_rl_with_the_int8_onnxruntime_sampler_learns(sft_model):
    model, tok = sft_model
    trainer = RLTrainer(copy.deepcopy(model), tok, cfg(**LEARN, rollout=RolloutConfig(backend="onnxruntime",
                                                                                      dtype="int8")))
    rows = [trainer.step() for _ in range(trainer.cfg.steps)]
    before, after = held_out_reward(model, tok), held_out_reward(trainer.model, tok)
    assert after >= before + 0.15, (before, after)
    # int8 is another policy, close to the trainer's: a mismatch well above the fp32 graph's rounding
    # (< 1e-6 a step, above), which TIS corrects
    assert statistics.mean(row["mismatch_k3"] for row in rows) > 2e-6 and all(row["ess"] > 0.999 for row in rows)


def held_out_reward(model, tok, n=48, k=4) -> float:
    """Mean reward (correct + format) of k samples at temperature 1 on n test problems."""
    task = get_task("arithmetic", **TASK)
    examples = task.examples("test", n, seed=0)
    out = complete(model, tok, [ex.question for ex in examples], SamplingParams(1.0, 1.0, 16), k=k,
                   generator=torch.Generator().manual_seed(0), reward=lambda text, i: task.reward(text, examples[i // k]))
    return sum(s["correct"] + s["format"] for s in out.scores) / len(out.scores)


def test_rl_with_a_bf16_sampler_learns(sft_model, tmp_path):
    model, tok = sft_model
    trained = copy.deepcopy(model)
    rows = rl(trained, tok, cfg(**LEARN, rollout=RolloutConfig(dtype="bf16")), tmp_path)
    before, after = held_out_reward(model, tok), held_out_reward(trained, tok)
    assert after >= before + 0.15, (before, after)
    assert all(row["ess"] > 0.9 and row["mismatch_k3"] < 1e-2 for row in rows)


def test_resume_with_a_rollout_backend_is_exact(sft_model, tmp_path):
    """Killed after step 3 with a checkpoint at step 2, then resumed in a new process (a new
    trainer and a new sampler built from the initial model): the run equals an uninterrupted one."""
    model, tok = sft_model
    res = ResilienceConfig(checkpoint_every=2)
    run = lambda **kw: cfg(steps=5, rollout=RolloutConfig(dtype="bf16"), resilience=dataclasses.replace(res, **kw))
    clean = copy.deepcopy(model)
    rl(clean, tok, run(), tmp_path / "clean")
    first = RLTrainer(copy.deepcopy(model), tok, run())
    train_loop(first, tmp_path / "killed", first.cfg.resilience, 3, "rl")
    shutil.rmtree(checkpoint.listing(tmp_path / "killed" / "checkpoints")[0])  # step 3's: killed before it landed
    resumed = RLTrainer(copy.deepcopy(model), tok, run(resume=True))
    rows = train_loop(resumed, tmp_path / "killed", resumed.cfg.resilience, 5, "rl")
    assert rows[0]["step"] == 3
    drop = {"weight_sync_s"}
    assert comparable(read_jsonl(tmp_path / "killed" / "metrics.jsonl"), drop) == comparable(
        read_jsonl(tmp_path / "clean" / "metrics.jsonl"), drop)
    assert same_weights(resumed.model, clean)


def test_rollout_flag_takes_parity_backend_specs(sft_model, tmp_path, monkeypatch, capsys):
    assert rollout_section("onnxruntime:cpu:fp32") == {"backend": "onnxruntime", "provider": "cpu", "dtype": "fp32"}
    assert rollout_section("torch:cuda:bf16") == {"backend": "torch", "device": "cuda", "dtype": "bf16"}
    assert rollout_section("onnxruntime:cpu:int4") == {"backend": "onnxruntime", "provider": "cpu", "dtype": "int4"}
    model, tok = sft_model
    save_model(model, tok, tmp_path / "model")
    for args, message in [(["--rollout", "tensorflow:cpu"], "backend spec 'tensorflow:cpu'"),
                          (["--rollout", "onnxruntime:cpu:bf16"], "onnxruntime runs dtype fp32 | fp16 | int8 | int4"),
                          (["--correction", "is"], "unknown correction 'is'")]:
        monkeypatch.setattr(sys, "argv", ["keel", "rl", "--model", str(tmp_path / "model"), "--out",
                                          str(tmp_path / "out"), *args])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_the_correction_weighs_the_trainers_loss(sft_model):
    """The same rollouts (same sampler, same seed) trained on with no correction, and with IcePop
    bounds [1, 1], which drop every token whose bf16 log-prob is not exactly the fp32 one."""
    model, tok = sft_model
    rows = {}
    for name, extra in [("none", {}), ("icepop", {"icepop_low": 1.0, "icepop_high": 1.0})]:
        trainer = RLTrainer(copy.deepcopy(model), tok, cfg(rollout=RolloutConfig(dtype="bf16"), correction=name,
                                                           updates_per_batch=1, beta=0.0, **extra))
        rows[name] = trainer.step()
    none, icepop = rows["none"], rows["icepop"]
    assert none["reward"] == icepop["reward"] and none["mismatch_kl"] == icepop["mismatch_kl"]  # same rollouts
    assert none["correction_share"] == 0.0 and none["ess"] == 1.0
    assert icepop["correction_share"] > 0.5 and icepop["ess"] < 0.5
    assert 0 <= icepop["grad_norm"] < 0.5 * none["grad_norm"]
