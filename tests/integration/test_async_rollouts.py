"""async_steps 1: a copy of the model samples step n+1's rollouts in a worker thread while the
trainer learns from step n's. The sampler gets the weights at fixed points (before each step's
sampling starts), so the rollouts it draws are those of the weights one update behind, whatever
the threads' timing, and a killed run resumes exactly from its checkpointed in-flight batch."""

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keel.cli import main
from keel.config import LoraSpec, ResilienceConfig, RLConfig
from keel.engine.backends import TorchBackend
from keel.engine.sampler import completion_logprobs
from keel.models import merged_copy, save_model, special_ids
from keel.resilience import checkpoint
from keel.rl.overlap import Overlap, split_threads
from keel.rl.trainer import RLTrainer, rl
from keel.runlog import read_jsonl
from keel.train.loop import TIMING_KEYS, train_loop

ROOT = Path(__file__).resolve().parents[2]
TASK = {"digits": 2}


def cfg(**changes) -> RLConfig:
    base = RLConfig(task_options=TASK, steps=5, prompts_per_step=2, group_size=4, max_new_tokens=16,
                    updates_per_batch=2, beta=0.0, lr=1e-3, seed=3, async_steps=1)
    return dataclasses.replace(base, **changes)


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def sampled_logprobs(model, tokenizer, batch) -> torch.Tensor:
    """The batch's completion tokens' log-probs under `model`, padded as the batch's own."""
    with torch.no_grad():
        logp, mask, _ = completion_logprobs(model, batch.prompts, batch.completions, pad_id=special_ids(tokenizer)[1])
    return torch.where(mask.bool(), logp, 0.0)


def test_the_sampler_is_a_copy_one_update_behind_and_the_correction_is_on(sft_model):
    model, tok = sft_model
    trainer = RLTrainer(copy.deepcopy(model), tok, cfg(beta=0.01))  # the KL term: every row trains
    assert isinstance(trainer.sampler, TorchBackend) and trainer.sampler.model is not trainer.model
    assert trainer.correction == "tis"
    weights = [copy.deepcopy(trainer.model)]  # W_0, W_1, ...
    rows = []
    for _ in range(3):
        rows.append(trainer.step())
        weights.append(copy.deepcopy(trainer.model))
        # After step n the next batch is ready; it was sampled with W_{n-1}, not with W_n.
        n = trainer.step_idx
        batch = trainer.pending
        recorded = batch.sampling_logprobs("cpu")
        behind = (sampled_logprobs(weights[n - 1], tok, batch) - recorded).abs().max().item()
        current = (sampled_logprobs(weights[n], tok, batch) - recorded).abs().max().item()
        assert behind < 1e-4 < current, (n, behind, current)
    assert abs(rows[0]["mismatch_kl"]) < 1e-6 and rows[0]["correction_share"] == 0.0  # step 1: on-policy
    assert all(row["mismatch_k3"] > 1e-7 for row in rows[1:])  # then one update behind
    assert all(row["grad_norm"] > 0 for row in rows)



def test_with_lora_the_copy_samples_the_merged_weights_one_update_behind(sft_model):
    """async_steps 1 under LoRA: the sampler is a plain model with the adapters merged in (no
    adapter layers of its own), and each next batch is drawn with the merged weights one update behind."""
    model, tok = sft_model
    trainer = RLTrainer(copy.deepcopy(model), tok, cfg(beta=0.01, lora=LoraSpec(r=4)))
    assert not any("lora_" in k for k in trainer.sampler.model.state_dict())
    merged = [merged_copy(trainer.peft)]  # the merged W_0, W_1, ...
    for _ in range(2):
        row = trainer.step()
        merged.append(merged_copy(trainer.peft))
        n, batch = trainer.step_idx, trainer.pending
        recorded = batch.sampling_logprobs("cpu")
        behind = (sampled_logprobs(merged[n - 1], tok, batch) - recorded).abs().max().item()
        current = (sampled_logprobs(merged[n], tok, batch) - recorded).abs().max().item()
        assert behind < 1e-4 < current, (n, behind, current)
        assert row["grad_norm"] > 0

def test_async_kill_and_resume_is_bit_identical(sft_model, tmp_path):
    """Killed after step 3 with a checkpoint at step 2, resumed in a new trainer (a new sampler
    built from the initial model): the in-flight batch comes back from the checkpoint and the run
    equals an uninterrupted one, metrics and final weights bit for bit."""
    model, tok = sft_model
    run = lambda **kw: cfg(resilience=ResilienceConfig(checkpoint_every=2, **kw))
    clean = copy.deepcopy(model)
    rl(clean, tok, run(), tmp_path / "clean")
    first = RLTrainer(copy.deepcopy(model), tok, run())
    train_loop(first, tmp_path / "killed", first.cfg.resilience, 3, "rl")
    shutil.rmtree(checkpoint.listing(tmp_path / "killed" / "checkpoints")[0])  # step 3's: killed before it landed
    saved = checkpoint.listing(tmp_path / "killed" / "checkpoints")[0]
    state = json.loads((saved / "state.json").read_text())["trainer"]
    assert saved.name == "00000002" and len(state["data"]["pending"]["completions"]) == 8
    resumed = RLTrainer(copy.deepcopy(model), tok, run(resume=True))
    rows = train_loop(resumed, tmp_path / "killed", resumed.cfg.resilience, 5, "rl")
    assert rows[0]["step"] == 3
    clean_rows = read_jsonl(tmp_path / "clean" / "metrics.jsonl")
    assert comparable(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == comparable(clean_rows)
    assert any(row["rows_skipped"] < 1 and row["grad_norm"] > 0 for row in clean_rows)  # it trained
    assert same_weights(resumed.model, clean) and not same_weights(clean, model)


def test_async_steps_flag(sft_model, tmp_path, monkeypatch, capsys):
    model, tok = sft_model
    save_model(model, tok, tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["keel", "rl", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                                      "--async-steps", "2"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "async_steps must be 0 or 1" in err and len(err.strip().splitlines()) == 1, err


def test_the_two_sides_split_the_threads_and_the_caller_gets_its_own_back():
    assert [split_threads(n) for n in (1, 2, 3, 16)] == [(1, 1), (1, 1), (2, 1), (8, 8)]
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        overlap = Overlap()
        overlap.start(torch.get_num_threads)
        during = torch.get_num_threads()
        assert (during, overlap.join(), torch.get_num_threads()) == (2, 2, 4)
    finally:
        torch.set_num_threads(before)


RECIPE = """task: arithmetic
task_options: {digits: 2}
steps: 4
prompts_per_step: 2
group_size: 4
max_new_tokens: 16
updates_per_batch: 2
beta: 0.01
lr: 1.0e-3
seed: 3
async_steps: 1
resilience: {checkpoint_every: 2}
"""  # beta > 0: every row trains, whichever rewards the samples get (the guard below needs a gradient)


def keel(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "keel", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)


def test_sigkilled_mid_overlap_and_restarted_run_is_bit_identical(sft_model, tmp_path):
    """SIGKILL after the backward of step 3, while the worker thread samples step 4's batch;
    `--max-restarts` resumes from step 2's checkpoint: metrics and OUT/model as an unkilled run."""
    model, tok = sft_model
    save_model(model, tok, tmp_path / "model")
    (tmp_path / "rl.yaml").write_text(RECIPE)
    common = ("rl", "--model", tmp_path / "model", "--recipe", tmp_path / "rl.yaml")
    clean = keel(*common, "--out", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    killed = keel(*common, "--out", tmp_path / "killed", "--inject", "kill@step=3", "--max-restarts", "2")
    assert killed.returncode == 0, killed.stderr
    events = read_jsonl(tmp_path / "killed" / "events.jsonl")
    assert [e["exit_code"] for e in events if e["event"] == "restart"] == [-9]
    clean_rows = read_jsonl(tmp_path / "clean" / "metrics.jsonl")
    assert comparable(read_jsonl(tmp_path / "killed" / "metrics.jsonl")) == comparable(clean_rows)
    assert any(row["grad_norm"] > 0 for row in clean_rows[2:])  # the steps after the resume trained
    a, b = load_file(tmp_path / "clean" / "model" / "model.safetensors"), load_file(
        tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
