"""Micro-batched updates equal one-batch updates: for every RL loss (each with its own normaliser)
and for SFT, the gradients accumulated over micro-batches match the gradient of the whole batch
to fp32 rounding, and so do the logged statistics."""

import pytest
import torch

from keel.config import LOSSES, RLConfig, SFTConfig
from keel.models import init_model, render_prompt, special_ids
from keel.rl.trainer import Batch, RLTrainer
from keel.tasks import get_task
from keel.train.sft import SFTTrainer, encode_traces, pack

NO_CLIP = 1e9  # clipping would hide a wrong gradient scale


def rl_batch(tokenizer) -> Batch:
    """3 groups of 4 with ragged completions (1-13 tokens) and mixed rewards."""
    g = torch.Generator().manual_seed(5)
    examples = get_task("arithmetic", digits=2).examples("train", 3, seed=1)
    prompts = [render_prompt(tokenizer, ex.question) for ex in examples for _ in range(4)]
    completions = [torch.randint(10, 40, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist()
                   for _ in prompts]
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1])
    return Batch(prompts, completions, rewards, rewards, torch.zeros(12), torch.ones(12, dtype=torch.bool), 12)


def record_grads(trainer) -> list:
    """Every optimizer step's gradients, in parameter order, taken just before the step."""
    seen, step = [], trainer.optimizer.step

    def recording_step(*a, **k):
        seen.append([p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None])
        return step(*a, **k)

    trainer.optimizer.step = recording_step
    return seen


def assert_grads_close(a: list, b: list, rtol: float = 1e-5) -> None:
    assert len(a) == len(b) and a
    for step_a, step_b in zip(a, b):
        scale = max(g.abs().max().item() for g in step_a)
        worst = max((x - y).abs().max().item() for x, y in zip(step_a, step_b))
        assert scale > 0 and worst <= rtol * scale, (worst, scale)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_micro_batched_rl_update_is_the_full_batch_update(loss):
    rows, grads = {}, {}
    for budget in (16384, 40):
        model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
        cfg = RLConfig(loss=loss, task_options={"digits": 2}, group_size=4, prompts_per_step=3, lr=1e-3,
                       grad_clip=NO_CLIP, beta=0.02, updates_per_batch=2, max_new_tokens=16, device="cpu",
                       micro_batch_tokens=budget)
        trainer = RLTrainer(model, tok, cfg)
        batch = rl_batch(tok)
        if budget == 40:
            assert len(batch.micro_batches(budget)) >= 4  # the split is real, and ragged
        grads[budget] = record_grads(trainer)
        rows[budget] = trainer.update(batch)
    assert_grads_close(grads[16384], grads[40])
    for key in ("loss", "clip_frac", "kl", "entropy", "response_length", "tokens"):
        assert rows[40][key] == pytest.approx(rows[16384][key], rel=1e-5, abs=1e-7), key


def test_micro_batches_respect_the_budget_and_keep_every_row_once():
    _, tok = init_model("qwen3", layers=1, hidden=32, seed=0)
    batch = rl_batch(tok)
    for budget in (1, 30, 40, 100, 10_000):
        groups = batch.micro_batches(budget)
        assert [i for g in groups for i in g] == list(range(12))
        for g in groups:
            padded = len(g) * (max(len(batch.prompts[i]) for i in g) + max(len(batch.completions[i]) for i in g))
            assert padded <= budget or len(g) == 1


def test_micro_batched_sft_update_is_the_full_batch_update():
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
    pairs = encode_traces(tok, get_task("arithmetic", digits=2).examples("train", 12, seed=0))
    batch = pack(pairs, 64, special_ids(tok)[1])
    assert len(batch.input_ids_BT) >= 4
    losses, grads = {}, {}
    for budget in (16384, 64):  # 64: one packed row per micro-batch
        model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
        trainer = SFTTrainer(model, tok, SFTConfig(task_options={"digits": 2}, examples=12, lr=1e-3, warmup=0,
                                                   grad_clip=NO_CLIP, device="cpu", micro_batch_tokens=budget))
        grads[budget] = record_grads(trainer)
        losses[budget] = trainer.update(batch)["loss"]
    assert_grads_close(grads[16384], grads[64])
    assert losses[64] == pytest.approx(losses[16384], rel=1e-6)


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(stage):
    grads, layer_calls = {}, {}
    for checkpointing in (False, True):
        model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
        calls, mlp = [], model.model.layers[0].mlp
        forward = mlp.forward  # counted here: module hooks do not run again in the recompute
        mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        if stage == "sft":
            trainer = SFTTrainer(model, tok, SFTConfig(task_options={"digits": 2}, examples=12, warmup=0,
                                                       grad_clip=NO_CLIP, device="cpu",
                                                       gradient_checkpointing=checkpointing))
            batch = pack(encode_traces(tok, get_task("arithmetic", digits=2).examples("train", 12, seed=0)), 64,
                         special_ids(tok)[1])
        else:
            trainer = RLTrainer(model, tok, RLConfig(task_options={"digits": 2}, group_size=4, prompts_per_step=3,
                                                     grad_clip=NO_CLIP, device="cpu",
                                                     gradient_checkpointing=checkpointing))
            batch = rl_batch(tok)
        grads[checkpointing] = record_grads(trainer)
        trainer.update(batch)
        layer_calls[checkpointing] = len(calls)
    assert layer_calls[True] == 2 * layer_calls[False]  # every forward of the layer ran again in the backward
    assert_grads_close(grads[False], grads[True], rtol=1e-6)


def test_rollout_batch_size_generates_in_chunks_of_that_many_rows(monkeypatch):
    import keel.completions as completions

    sizes, generate = [], completions.generate
    monkeypatch.setattr(completions, "generate", lambda model, prompts, *a, **k: sizes.append(len(prompts))
                        or generate(model, prompts, *a, **k))
    model, tok = init_model("qwen3", layers=1, hidden=32, seed=0)
    trainer = RLTrainer(model, tok, RLConfig(task_options={"digits": 2}, group_size=4, prompts_per_step=3,
                                             max_new_tokens=4, device="cpu", rollout_batch_size=5))
    batch = trainer.collect()
    assert sizes == [5, 5, 2] and len(batch.completions) == 12 and len(batch.logprobs) == 12


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_padding_free_rl_update_is_the_padded_update(loss):
    rows, grads = {}, {}
    for padding_free, budget in ((False, 16384), (True, 16384), (True, 40)):
        model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
        cfg = RLConfig(loss=loss, task_options={"digits": 2}, group_size=4, prompts_per_step=3, grad_clip=NO_CLIP,
                       beta=0.02, updates_per_batch=2, max_new_tokens=16, device="cpu", padding_free=padding_free,
                       micro_batch_tokens=budget)
        trainer = RLTrainer(model, tok, cfg)
        grads[padding_free, budget] = record_grads(trainer)
        rows[padding_free, budget] = trainer.update(rl_batch(tok))
    for key in ((True, 16384), (True, 40)):
        assert_grads_close(grads[False, 16384], grads[key])
        for stat in ("loss", "clip_frac", "kl", "entropy"):
            assert rows[key][stat] == pytest.approx(rows[False, 16384][stat], rel=1e-5, abs=1e-7), (key, stat)


def test_packed_micro_batches_count_real_tokens():
    _, tok = init_model("qwen3", layers=1, hidden=32, seed=0)
    batch = rl_batch(tok)
    real = [len(p) + len(c) for p, c in zip(batch.prompts, batch.completions)]
    for budget in (1, 40, 100, 10_000):
        groups = batch.micro_batches(budget, packed=True)
        assert [i for g in groups for i in g] == list(range(12))
        assert all(sum(real[i] for i in g) <= budget or len(g) == 1 for g in groups)
    assert len(batch.micro_batches(100, packed=True)) < len(batch.micro_batches(100))  # padding no longer counts
