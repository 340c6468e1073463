"""Data parallel and DiLoCo: two real gloo processes under torchrun, compared with one process.

One torchrun launch (module fixture) runs tests/distributed/worker.py, which trains fresh tiny
models on fixed batches under each sync mode; the tests compare what every rank ended with
against single-process training here, and the byte counters against the tensors' sizes; a
second launch (fsdp_worker.py) does the same for FSDP2, with checkpoints and a resume. The
CLI tests kill a rank of a real `torchrun -m keel rl` run and check that torchrun's restart
resumes it to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keel.config import DistributedConfig
from keel.distributed import Comm, DiLoCo, Sync, World
from keel.resilience.ranks import gather_state, rank_state
from keel.errors import KeelError
from keel.resilience.faults import Fault, parse
from keel.rl.trainer import Batch
from keel.runlog import read_jsonl
from tests.distributed import worker

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args, cwd=ROOT, timeout=240, nproc=2, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    torchrun(str(ROOT / "tests/distributed/worker.py"), str(out))
    return out


def weights(out: Path, name: str, rank: int) -> dict:
    return load_file(out / f"{name}-rank{rank}.safetensors")


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


def single_process(trainer, batches: list, steps: int = worker.STEPS) -> dict:
    for step in range(steps):
        trainer.step_idx = step
        trainer.update(batches)
    return worker.weights(trainer)


def moved(before: dict, after: dict) -> float:
    return max((after[k] - before[k]).abs().max().item() for k in before)


# ---- two processes -----------------------------------------------------------------------------

def test_ddp_keeps_ranks_identical_and_matches_one_process_on_the_global_batch(ranks_out):
    import dataclasses
    from keel.train.sft import Packed

    r0, r1 = weights(ranks_out, "sft_ddp", 0), weights(ranks_out, "sft_ddp", 1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    _, tok = worker.model()
    parts = worker.sft_batches(tok, 2)
    assert int((parts[0].labels_BT != -100).sum()) != int((parts[1].labels_BT != -100).sum())  # unequal shares
    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    whole = Packed(*(cat(f.name) for f in dataclasses.fields(Packed)))
    trainer = worker.sft_trainer(DistributedConfig())
    start = worker.weights(trainer)
    reference = single_process(trainer, whole)
    assert moved(start, reference) > 1e-3  # the comparison is not between two untrained models
    assert_close(r0, reference, atol=2e-6)


def test_ddp_rl_update_matches_one_process_on_the_global_batch(ranks_out):
    from keel.rl.trainer import Batch

    r0, r1 = weights(ranks_out, "rl_ddp", 0), weights(ranks_out, "rl_ddp", 1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    _, tok = worker.model()
    a, b = worker.rl_batches(tok, 2)
    whole = Batch(a.prompts + b.prompts, a.completions + b.completions, torch.cat([a.rewards_B, b.rewards_B]),
                  torch.cat([a.correct_B, b.correct_B]), torch.cat([a.format_B, b.format_B]),
                  torch.cat([a.finished_B, b.finished_B]), a.sampled + b.sampled)
    trainer = worker.rl_trainer(DistributedConfig())
    start = worker.weights(trainer)
    reference = single_process(trainer, whole)
    assert moved(start, reference) > 1e-3
    # AdamW (lr 1e-3): its first steps are about lr * sign(g), so rounding gaps in near-zero gradients
    # (each rank's forward pads to its own longest row; rows without signal are not run) show up
    # as weight gaps of a few 1e-6; the micro-batched SGD tests below hold the gradients to 1e-7.
    assert_close(r0, reference, atol=5e-6)


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_micro_batched_ddp_rl_update_matches_one_process_on_the_whole_batch(ranks_out, loss):
    from keel.rl.trainer import Batch

    r0, r1 = weights(ranks_out, f"rl_{loss}_micro_ddp", 0), weights(ranks_out, f"rl_{loss}_micro_ddp", 1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    _, tok = worker.model()
    a, b = worker.rl_batches(tok, 2)
    assert len(a.micro_batches(40)) >= 3 and len(b.micro_batches(40)) >= 3
    whole = Batch(a.prompts + b.prompts, a.completions + b.completions, torch.cat([a.rewards_B, b.rewards_B]),
                  torch.cat([a.correct_B, b.correct_B]), torch.cat([a.format_B, b.format_B]),
                  torch.cat([a.finished_B, b.finished_B]), a.sampled + b.sampled)
    trainer = worker.rl_trainer(DistributedConfig(), sgd=True, loss=loss)  # one process, one micro-batch
    start = worker.weights(trainer)
    reference = single_process(trainer, whole)
    assert moved(start, reference) > 1e-4
    assert_close(r0, reference, atol=1e-7)


def test_diloco_with_one_inner_step_outer_lr_1_no_momentum_is_ddp_for_sgd(ranks_out):
    ddp, diloco = weights(ranks_out, "sgd_ddp", 0), weights(ranks_out, "sgd_diloco", 0)
    assert all(torch.equal(diloco[k], weights(ranks_out, "sgd_diloco", 1)[k]) for k in diloco)
    assert_close(diloco, ddp, atol=1e-6)
    start = worker.weights(worker.rl_trainer(DistributedConfig()))
    assert moved(start, ddp) > 1e-3


def test_diloco_ranks_agree_after_a_sync_in_every_wire_format(ranks_out):
    for compress in ("none", "bf16", "int8"):
        r0, r1 = weights(ranks_out, f"diloco_{compress}", 0), weights(ranks_out, f"diloco_{compress}", 1)
        assert all(torch.equal(r0[k], r1[k]) for k in r0), compress  # 4 steps, H = 2: synced at the end
    exact = weights(ranks_out, "diloco_none", 0)
    assert_close(weights(ranks_out, "diloco_bf16", 0), exact, atol=1e-3)
    assert_close(weights(ranks_out, "diloco_int8", 0), exact, atol=1e-3)


def test_byte_counts_are_the_tensor_sizes(ranks_out):
    m, _ = worker.model()
    params = [p for p in m.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    f0, f1 = (json.loads((ranks_out / f"figures-rank{r}.json").read_text()) for r in (0, 1))
    assert f0["sft_ddp"]["setup"] == {"setup": 4 * n} and f1["sft_ddp"]["setup"] == {"setup": 0}  # rank 0 broadcasts
    for f in (f0, f1):
        assert f["sft_ddp"]["total"]["grads"] == worker.STEPS * 4 * n  # one fp32 all-reduce per step
        syncs = 2  # 4 inner steps, H = 2
        assert f["diloco_none"]["total"]["pseudo_grads"] == syncs * 4 * n
        assert f["diloco_bf16"]["total"]["pseudo_grads"] == syncs * 2 * n
        assert f["diloco_int8"]["total"]["pseudo_grads"] == syncs * (n + 4 * len(params))  # + one fp32 scale per tensor
        assert "grads" not in f["diloco_none"]["total"]  # no gradient traffic between syncs


@pytest.fixture(scope="module")
def fsdp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("-m", "tests.distributed.fsdp_worker", str(out))
    return out


@pytest.fixture
def chunked_head(monkeypatch):
    """The one-process reference runs its LM head as the fsdp worker ran it: in chunks, every batch
    over the logits budget (tests/unit/test_chunked_head.py: chunks equal the whole head)."""
    from keel.engine import head

    monkeypatch.setattr(head, "LOGITS_BUDGET", 1)


def whole_sft_batch(parts: list):
    """The ranks' packed batches as one batch: the global batch of a step."""
    import dataclasses
    from keel.train.sft import Packed

    cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
    return Packed(*(cat(f.name) for f in dataclasses.fields(Packed)))


def ranks_follow_one_process(fsdp_out, name: str, trainer, batch, atol: float):
    """Steps `trainer` (one process) on the global `batch` as the fsdp worker stepped its `name`
    run: after each, both ranks' gathered weights are equal, and within `atol` of the trainer's.
    Returns rank 0's last weights."""
    for step in range(worker.STEPS):
        trainer.step_idx = step
        trainer.update(batch)
        r0, r1 = (weights(fsdp_out, f"{name}_step{step + 1}", r) for r in (0, 1))
        assert all(torch.equal(r0[k], r1[k]) for k in r0)
        model = trainer.model
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert_close(r0, {k: v.detach() for k, v in model.state_dict().items() if not (tied and "lm_head" in k)},
                     atol=atol)  # a tied head once, as the worker saves it
    return r0


@pytest.mark.usefixtures("chunked_head")
def test_fsdp_sft_steps_match_one_process_on_the_global_batch_and_ranks_agree(fsdp_out):
    from tests.distributed import fsdp_worker

    _, tok = worker.model()
    parts = fsdp_worker.batches(tok, 2)
    assert [len(p.input_ids_BT) for p in parts] == [3, 2]  # micro-batches per step: FSDP's collectives must still pair up
    assert int((parts[0].labels_BT != -100).sum()) != int((parts[1].labels_BT != -100).sum())  # unequal shares
    trainer = fsdp_worker.trainer(DistributedConfig())
    start = worker.weights(trainer)
    whole = whole_sft_batch(parts)
    norms = json.loads((fsdp_out / "fsdp_grad_norms-rank0.json").read_text())
    assert norms == json.loads((fsdp_out / "fsdp_grad_norms-rank1.json").read_text())
    for step in range(worker.STEPS):
        trainer.step_idx = step
        row = trainer.update(whole)
        assert row["grad_norm"] > fsdp_worker.CLIP  # the clip binds: the sharded norm must be the global one
        assert norms[step] == pytest.approx(row["grad_norm"], rel=1e-6)
        r0, r1 = (weights(fsdp_out, f"fsdp_step{step + 1}", r) for r in (0, 1))
        assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the gathered full weights of both ranks
        # Measured 6.4e-7 at every step (fp32, CPU): the micro-batch gradients add up in another
        # order, and AdamW's first step, about lr * sign(g), turns that rounding in near-zero
        # gradient entries into weight gaps of up to ~1e-3 * lr (the DDP test allows 2e-6 too).
        assert_close(r0, worker.weights(trainer), atol=5e-6)
    assert moved(start, worker.weights(trainer)) > 1e-3


@pytest.mark.usefixtures("chunked_head")
def test_fsdp_sft_steps_with_an_untied_head_match_one_process(fsdp_out):
    """The head a weight of its own, sharded with the root apart from the embeddings: its gradient,
    from the chunked head, is the unsharded one."""
    from tests.distributed import fsdp_worker

    _, tok = worker.model()
    trainer = fsdp_worker.trainer(DistributedConfig(), model=fsdp_worker.untied())
    full = lambda: {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}  # noqa: E731
    start = full()
    assert not torch.equal(start["lm_head.weight"], start["model.embed_tokens.weight"])
    # Measured 4.2e-6 at every step, in one entry each of two layer-0 projections (AdamW's first
    # step, see above); the head itself at most 2.3e-8.
    r0 = ranks_follow_one_process(fsdp_out, "untied", trainer, whole_sft_batch(fsdp_worker.batches(tok, 2)), 5e-6)
    assert_close({"h": r0["lm_head.weight"]}, {"h": full()["lm_head.weight"]}, atol=1e-7)
    assert moved({"h": start["lm_head.weight"]}, {"h": r0["lm_head.weight"]}) > 1e-3


def test_fsdp_runs_the_sharded_lm_head_in_chunks_and_never_whole(fsdp_out):
    """Every batch in the fsdp worker was over the logits budget: SFT (tied, untied, LoRA) and RL
    (the policy and the sharded KL reference) ran the head in chunks through the root's FSDP forward
    method, and no [N, V] logits came from the head module. A sharded head used to be refused and
    compute whole logits."""
    from tests.distributed import fsdp_worker

    model, _ = worker.model()
    calls = fsdp_worker.count_whole_heads(model)
    model(input_ids=torch.tensor([[1, 2, 3]]))
    assert calls == [1]  # the counter sees a whole-logits forward
    for rank in (0, 1):
        heads = json.loads((fsdp_out / f"heads-rank{rank}.json").read_text())
        assert set(heads) == {"fsdp", "untied", "lora", "rl", "rl_stage"}
        assert all(h["chunked"] for h in heads.values()), heads
        assert all(h["whole"] == 0 for name, h in heads.items() if name != "rl_stage"), heads


def test_fsdp_checkpoint_resumes_exactly(fsdp_out):
    """The sharded (DCP) layout and resharding: tests/distributed/test_sharded_checkpoints.py."""
    resumed, whole = weights(fsdp_out, "fsdp_resumed", 0), weights(fsdp_out, "fsdp_whole", 0)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # stopped at step 2 and resumed: bit-identical
    assert [e["step"] for e in read_jsonl(fsdp_out / "cut/events.jsonl") if e["event"] == "resume"] == [2]


def test_fsdp_lora_checkpoint_resumes_exactly(fsdp_out):
    resumed, whole = weights(fsdp_out, "lora_resumed", 1), weights(fsdp_out, "lora_whole", 1)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    trained = [v for k, v in whole.items() if "lora_B" in k]  # zeros at the start
    assert trained and max(v.abs().max().item() for v in trained) > 1e-4
    assert [e["step"] for e in read_jsonl(fsdp_out / "lora_cut/events.jsonl") if e["event"] == "resume"] == [2]


def test_fsdp_out_model_is_a_plain_hf_directory(fsdp_out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp_out / "whole/model")
    assert type(model).__name__ == "Qwen3ForCausalLM"
    whole, loaded = weights(fsdp_out, "fsdp_whole", 0), model.state_dict()
    assert all(torch.equal(loaded[k], whole[k]) for k in whole)


def test_fsdp_cpu_offload_runs_and_changes_nothing_on_cpu(fsdp_out):
    # On a CPU run the shards live in host memory already: CPUOffloadPolicy moves nothing, so the
    # step is bit for bit the one without it. What it saves shows on an accelerator only.
    for rank in (0, 1):
        offloaded, plain = weights(fsdp_out, "offload_step1", rank), weights(fsdp_out, "fsdp_step1", rank)
        assert all(torch.equal(offloaded[k], plain[k]) for k in plain)


def sft_passes(cfg, tokenizer, ranks: int, steps: int) -> list[int]:
    """Forward and backward passes in each step of an SFT run on `ranks` ranks, as SFTTrainer.update
    runs them under fsdp: the most micro-batches of any rank's batch."""
    import math

    from keel.models import special_ids
    from keel.tasks import get_task
    from keel.train.sft import Batches, drop_thinking, encode_traces

    examples = get_task(cfg.task, **cfg.task_options).examples("train", cfg.examples, seed=cfg.seed)
    pairs = encode_traces(tokenizer, drop_thinking(examples, cfg.drop_thinking, cfg.seed))
    streams = [Batches(pairs[r::ranks], cfg.batch_tokens // ranks, special_ids(tokenizer)[1], cfg.seed)
               for r in range(ranks)]
    passes = []
    for _ in range(steps):
        batches = [s.next().input_ids_BT for s in streams]
        passes.append(max(math.ceil(len(b) / max(1, cfg.micro_batch_tokens // b.shape[1])) for b in batches))
    return passes


def test_fsdp_run_logs_fsdps_collectives_as_the_shard_sizes_say_and_its_peak_memory(fsdp_out):
    from keel.distributed.comm import fsdp_pass_bytes
    from keel.distributed.sync import decoder_layers
    from keel.report import format_goodput, goodput, plot_resources
    from tests.distributed import fsdp_worker

    model, tok = worker.model()
    layers = decoder_layers(model)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    per_pass = fsdp_pass_bytes([p.shape for p in model.parameters() if id(p) not in inside],
                               [[p.shape for p in layer.parameters()] for layer in layers], ranks=2)
    assert per_pass == {"all_gather": 440_960, "reduce_scatter": 454_400}  # fp32; vocab 103 pads to 2 x 52 rows
    rows = read_jsonl(fsdp_out / "whole/metrics.jsonl")  # rank 0's rows of a 4-step SFT run through the loop
    passes = sft_passes(fsdp_worker.trainer(DistributedConfig()).cfg, tok, ranks=2, steps=len(rows))
    assert len(rows) == 4 and min(passes) >= 2  # micro-batched: every pass gathers and scatters again
    for row, n in zip(rows, passes):
        assert row["comm_bytes_fsdp"] == n * sum(per_pass.values()), row["step"]
        assert row["comm_bytes"] == sum(v for k, v in row.items() if k.startswith("comm_bytes_"))
        assert row["peak_rss_mb"] > 10  # MB, the larger rank's: torch alone takes more
    for row in read_jsonl(fsdp_out / "rl/metrics.jsonl"):  # an RL stage under fsdp: the same columns
        assert row["comm_bytes_fsdp"] > 0 and row["peak_rss_mb"] > 10

    text = "\n".join(format_goodput(goodput(fsdp_out / "whole")))
    assert "MB/step fsdp" in text and "peak RSS MB max" in text
    mean = sum(r["comm_bytes_fsdp"] for r in rows) / len(rows) / 1e6
    assert f"{mean:.3g}" in text.splitlines()[-1].split()
    assert plot_resources(fsdp_out / "whole") == [fsdp_out / "whole/resources_sft.png"]


@pytest.mark.usefixtures("chunked_head")
def test_fsdp_lora_sft_steps_match_one_process_and_train_only_the_adapters(fsdp_out):
    from tests.distributed import fsdp_worker

    _, tok = worker.model()
    trainer = fsdp_worker.trainer(DistributedConfig(), lora=fsdp_worker.LORA)
    start = worker.weights(trainer)
    # measured 9.6e-7: AdamW's first steps (see above)
    r0 = ranks_follow_one_process(fsdp_out, "lora", trainer, whole_sft_batch(fsdp_worker.batches(tok, 2)), 2e-6)
    assert moved(start, r0) > 1e-3
    assert all(torch.equal(r0[k], start[k]) for k in start if "lora_" not in k)  # the base stays frozen


@pytest.mark.usefixtures("chunked_head")
def test_fsdp_rl_steps_with_a_sharded_reference_match_one_process_and_ranks_agree(fsdp_out):
    from tests.distributed import fsdp_worker

    _, tok = worker.model()
    a, b = worker.rl_batches(tok, 2)
    # Micro-batches per rank differ: the rank with fewer must still run as many FSDP passes
    # (reference forwards and policy forward/backward), or the collectives would not pair up.
    assert len(a.micro_batches(fsdp_worker.RL_MICRO)) != len(b.micro_batches(fsdp_worker.RL_MICRO))
    whole = Batch(a.prompts + b.prompts, a.completions + b.completions, torch.cat([a.rewards_B, b.rewards_B]),
                  torch.cat([a.correct_B, b.correct_B]), torch.cat([a.format_B, b.format_B]),
                  torch.cat([a.finished_B, b.finished_B]), a.sampled + b.sampled)
    trainer = fsdp_worker.rl_trainer(DistributedConfig())  # one process, the whole batch
    start = worker.weights(trainer)
    for step in range(worker.STEPS):
        trainer.step_idx = step
        trainer.update(whole)
        r0, r1 = (weights(fsdp_out, f"rl_step{step + 1}", r) for r in (0, 1))
        assert all(torch.equal(r0[k], r1[k]) for k in r0)
        assert_close(r0, worker.weights(trainer), atol=2e-6)  # measured 1.2e-6: AdamW's first steps (see above)
    assert moved(start, r0) > 1e-3
    assert trainer.ref is not None and moved(start, {k: v for k, v in trainer.ref.state_dict().items()
                                                     if k in start}) == 0  # the KL term had a fixed reference


@pytest.mark.usefixtures("chunked_head")
@pytest.mark.parametrize("name", ["rl_idle", "rl_idle_ddp"])
def test_fsdp_rank_without_data_runs_zero_weight_passes_and_the_step_is_the_other_ranks(fsdp_out, name):
    # Rank 1 has no data (dynamic sampling found no signal there) while rank 0 has: it runs what
    # rank 0 runs (loss-weight all-reduce; under fsdp every forward and backward: Sync.passes) on
    # stand-in rows at zero weight. Under ddp it used to skip the loss-weight all-reduce, pairing
    # rank 0's with its gradient all-reduce.
    from tests.distributed import fsdp_worker

    _, tok = worker.model()
    mine = worker.rl_batches(tok, 2)[0]
    trainer = fsdp_worker.rl_trainer(DistributedConfig())
    start = worker.weights(trainer)
    trainer.update(mine)  # one process on rank 0's batch: rank 1 held none and weighs 0
    r0, r1 = weights(fsdp_out, name, 0), weights(fsdp_out, name, 1)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert moved(start, r0) > 1e-3
    # Measured 0 under both (rank 1 adds exact zeros); 9e-7 when one side's head ran whole.
    assert_close(r0, worker.weights(trainer), atol=1e-7 if name == "rl_idle" else 2e-6)


def test_fsdp_rl_stage_samples_on_a_plain_copy_evaluates_it_and_writes_a_plain_model(fsdp_out):
    from transformers import AutoModelForCausalLM

    rows = read_jsonl(fsdp_out / "rl/metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and "test_pass@1" in rows[-1]  # evaluated on rank 0's copy
    # The copy in fp32 on the CPU computes what the sharded trainer computes: no correction, and
    # the sampler's log-probs are the trainer's to rounding.
    assert all(abs(r["mismatch_kl"]) < 1e-6 and r["correction_share"] == 0 for r in rows)
    model = AutoModelForCausalLM.from_pretrained(fsdp_out / "rl/model")
    assert type(model).__name__ == "Qwen3ForCausalLM"
    start = load_file(fsdp_out / "tiny/model.safetensors")
    trained = load_file(fsdp_out / "rl/model/model.safetensors")
    assert trained.keys() == start.keys() and moved(start, trained) > 1e-4


def test_fsdp_lora_rl_stage_writes_the_adapters_and_a_merged_plain_model(fsdp_out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stage = fsdp_out / "rl_lora"
    assert [r["step"] for r in read_jsonl(stage / "metrics.jsonl")] == [1, 2]
    model = AutoModelForCausalLM.from_pretrained(stage / "model")  # merged: no peft needed
    assert type(model).__name__ == "Qwen3ForCausalLM"
    start, merged = load_file(fsdp_out / "tiny/model.safetensors"), load_file(stage / "model/model.safetensors")
    assert merged.keys() == start.keys() and moved(start, merged) > 1e-4
    base = AutoModelForCausalLM.from_pretrained(fsdp_out / "tiny")
    adapted = PeftModel.from_pretrained(base, stage / "adapter").merge_and_unload()
    assert_close({k: v for k, v in adapted.state_dict().items() if k in merged}, merged, atol=1e-6)


def test_fsdp_takes_rl_and_lora_and_offload_only_with_fsdp():
    from keel.config import LoraSpec, ResilienceConfig, RLConfig, RolloutConfig, SFTConfig

    fsdp = DistributedConfig(sync="fsdp", offload=True)
    assert RLConfig(distributed=fsdp, beta=0.1, lora=LoraSpec()).distributed.offload
    assert SFTConfig(lora=LoraSpec(), distributed=fsdp).lora is not None
    with pytest.raises(KeelError, match="offload .* needs sync: fsdp") as e:
        DistributedConfig(sync="ddp", offload=True)
    assert e.value.field == "distributed.offload"
    # Rank 0 evaluates a plain torch model of the gathered weights when the sampler is not a torch copy.
    assert RLConfig(distributed=fsdp, eval_every=5, rollout=RolloutConfig(backend="onnxruntime")).eval_every == 5
    for make in (SFTConfig, RLConfig):  # checkpoints of lora under fsdp resume (test_fsdp_lora_checkpoint_resumes_exactly)
        assert make(lora=LoraSpec(), distributed=fsdp, resilience=ResilienceConfig(checkpoint_every=2)).lora


@pytest.fixture(scope="module")
def hsdp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp")
    torchrun("-m", "tests.distributed.hsdp_worker", str(out), nproc=4)
    return out


def two_diloco_workers(batches: list, steps: int, inner: int) -> list[dict]:
    """Today's DiLoCo between two workers (shard_group 1), simulated in one process: each worker
    trains on its own batch, and every `inner` steps the mean pseudo-gradient goes through the
    outer Nesterov SGD and both continue from the new global weights. Weights after each step."""
    from tests.distributed import hsdp_worker

    cfg = DistributedConfig(sync="diloco", inner_steps=inner)
    workers = [hsdp_worker.trainer(DistributedConfig()) for _ in batches]
    params = [list(w.model.parameters()) for w in workers]
    global_params = [p.detach().clone() for p in params[0]]
    outer = torch.optim.SGD(global_params, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=True)
    after = []
    for step in range(steps):
        for w, batch in zip(workers, batches):
            w.step_idx = step
            w.update(batch)
        if (step + 1) % inner == 0:
            with torch.no_grad():
                for g, *local in zip(global_params, *params):
                    g.grad = torch.stack([g - p for p in local]).mean(0)
                outer.step()
                for local in params:
                    for p, g in zip(local, global_params):
                        p.copy_(g)
        after.append([worker.weights(w) for w in workers])
    return after


def test_diloco_over_fsdp_groups_shard_inside_and_average_across_like_two_diloco_workers(hsdp_out):
    from tests.distributed import hsdp_worker

    groups = hsdp_worker.group_batches(worker.model()[1])
    reference = two_diloco_workers(groups, hsdp_worker.STEPS, hsdp_worker.INNER)
    for step in range(1, hsdp_worker.STEPS + 1):
        r = [weights(hsdp_out, f"hsdp_step{step}", rank) for rank in range(4)]
        for a, b in ((0, 1), (2, 3)):  # the two ranks of a group gather the same weights
            assert all(torch.equal(r[a][k], r[b][k]) for k in r[a]), (step, a, b)
        synced = step % hsdp_worker.INNER == 0
        assert all(torch.equal(r[0][k], r[2][k]) for k in r[0]) == synced, step  # groups agree after a sync only
        # A group trains on its batch as one DiLoCo worker does on it alone; measured gaps up to
        # 1.3e-7 (fp32, CPU): the rows' gradients add up in another order across the group's ranks.
        for group in (0, 1):
            assert_close(r[2 * group], reference[step - 1][group], atol=1e-6)
    start = worker.weights(hsdp_worker.trainer(DistributedConfig()))
    assert moved(start, r[0]) > 1e-3


def shard_numels() -> list[int]:
    """How many parameter elements group rank 0 and 1 hold: FSDP2 shards every parameter along
    dim 0 in torch.chunk's pieces, group rank i holding piece i."""
    m, _ = worker.model()
    params = [p for p in m.parameters() if p.requires_grad]
    shard = [sum(c[i].numel() if i < len(c) else 0 for c in (p.chunk(2) for p in params)) for i in (0, 1)]
    assert shard[0] + shard[1] == sum(p.numel() for p in params) and shard[0] != shard[1]
    return shard


def test_diloco_over_fsdp_sends_each_ranks_shard_across_groups_only(hsdp_out):
    shard = shard_numels()
    syncs = 2
    for rank in range(4):
        f = json.loads((hsdp_out / f"hsdp_figures-rank{rank}.json").read_text())
        assert f["hsdp"]["shard_numel"] == shard[rank % 2]
        sent = {k: v - f["hsdp"]["before"].get(k, 0) for k, v in f["hsdp"]["total"].items()}
        assert sent["pseudo_grads"] == syncs * 4 * shard[rank % 2]  # fp32, this rank's shard per sync
        assert sent["control"] == 4 * 2 * 8  # per step: the group's token total and pass count (fp64)
        assert "grads" not in sent  # FSDP's own collectives do not pass through keel's Comm
        assert "pseudo_grads" not in f["one_group"]  # one group: nobody to average with


def test_diloco_over_fsdp_with_one_group_is_one_worker_and_gathers_for_out_model(hsdp_out):
    from tests.distributed import hsdp_worker

    r = [weights(hsdp_out, "one_group", rank) for rank in range(4)]
    main = load_file(hsdp_out / "one_group_main.safetensors")  # full_state(main_only): OUT/model's weights
    assert all(torch.equal(r[0][k], x[k]) for x in r[1:] + [main] for k in r[0])
    batch = hsdp_worker.group_batches(worker.model()[1])[0]  # the 4 ranks held rows 0, 1, 2, 0 of it
    whole = whole_sft_batch([batch.rows(0, 3, "cpu"), batch.rows(0, 1, "cpu")])
    reference = two_diloco_workers([whole], steps=2, inner=1)[-1][0]  # one worker, an outer step every step
    assert_close(r[0], reference, atol=2e-6)  # measured 5.3e-7
    assert moved(worker.weights(hsdp_worker.trainer(DistributedConfig())), reference) > 1e-3


def test_diloco_over_fsdp_checkpoints_resume_exactly_with_each_groups_own_model(hsdp_out):
    """Two groups of two ranks through the training loop, checkpointing through DCP: resumed from
    step 3 (between syncs: the groups' weights and AdamW moments differ) it ends bit-identical to
    the whole run, which ends as the run without the loop and its checkpoints did."""
    from keel.resilience.checkpoint import ShardReader

    for rank in range(4):
        whole, resumed = weights(hsdp_out, "whole", rank), weights(hsdp_out, "resumed", rank)
        assert all(torch.equal(whole[k], resumed[k]) for k in whole), rank
        no_loop = weights(hsdp_out, "hsdp_step4", rank)
        assert all(torch.equal(whole[k], no_loop[k]) for k in whole), rank
    assert [e["step"] for e in read_jsonl(hsdp_out / "resumed/events.jsonl") if e["event"] == "resume"] == [3]
    keys = ShardReader(hsdp_out / "whole/checkpoints/00000003/dcp").read_metadata().state_dict_metadata
    name = "model.layers.0.self_attn.q_proj.weight"
    assert f"group0.model.{name}" in keys and f"group1.model.{name}" in keys and f"model.{name}" not in keys
    assert any(k.startswith("group1.optimizer.") for k in keys)
    assert {"sync.global.0", "sync.momentum.0"} <= set(keys)  # the outer state once, shared by the groups


def test_diloco_over_fsdp_byte_counts_are_the_shards_with_checkpoints_on(hsdp_out):
    shard = shard_numels()
    for rank in range(4):
        f = json.loads((hsdp_out / f"hsdp_figures-rank{rank}.json").read_text())["whole"]
        sent = {k: v - f["before"].get(k, 0) for k, v in f["total"].items()}
        assert sent["pseudo_grads"] == 2 * 4 * shard[rank % 2]  # two syncs of this rank's fp32 shard
        assert sent["control"] == 4 * 2 * 8
        # Two checkpoints: keel's Comm gathers only the rank-local RNG state onto rank 0 (whose own
        # part is not sent); the shards go through DCP's own process group.
        assert sent["checkpoint"] == (0 if rank == 0 else 2 * torch.get_rng_state().numel())


def test_report_shows_the_largest_step_of_communication(tmp_path):
    from keel.report import format_goodput, goodput
    from keel.runlog import RunLog

    log = RunLog(tmp_path)
    for step, sent in enumerate([1_000, 3_000_000, 1_000, 3_000_000], start=1):  # DiLoCo: a sync every 2 steps
        log.metrics({"stage": "sft", "step": step, "step_s": 1.0, "comm_bytes": sent, "comm_s": 0.1})
    log.close()
    (tmp_path / "events.jsonl").write_text('{"time": 0.0, "event": "run_start"}\n{"time": 5.0, "event": "run_end"}\n')
    g = goodput(tmp_path)
    assert g["comm_bytes"] == 6_002_000 and g["comm_bytes_per_step"] == 3_000_000
    assert "6.0 MB sent by rank 0 (at most 3.0 MB in a step)" in "\n".join(format_goodput(g))


def test_shard_group_is_diloco_only_and_refused_where_unsupported():
    from keel.config import LoraSpec, ResilienceConfig, RLConfig, SFTConfig

    assert DistributedConfig(sync="diloco", shard_group=2).shard_group == 2
    for bad in ({"shard_group": 0}, {"sync": "ddp", "shard_group": 2}, {"sync": "fsdp", "shard_group": 2}):
        with pytest.raises(KeelError, match="shard_group"):
            DistributedConfig(**bad)
    sharded = DistributedConfig(sync="diloco", shard_group=2)
    assert sharded.sharded and DistributedConfig(sync="fsdp").sharded and not DistributedConfig(sync="diloco").sharded
    for make in (SFTConfig, RLConfig):
        with pytest.raises(KeelError, match="lora"):
            make(lora=LoraSpec(), distributed=sharded)
        assert make(resilience=ResilienceConfig(checkpoint_every=2), distributed=sharded).distributed.shard_group == 2


def test_diloco_over_fsdp_checkpoints_resume_in_their_own_layout_only():
    from keel.distributed.sync import same_layout

    same_layout({"shard_group": 2, "world_size": 4}, {"world_size": 4, "shard_group": 2})
    same_layout({}, {})  # any other sync: its own checks
    four, two = {"shard_group": 2, "world_size": 4}, {"shard_group": 2, "world_size": 2}
    cases = ((four, {"shard_group": 4, "world_size": 4}, "written by DiLoCo over FSDP \\(shard_group 2, 4"),
             (four, two, "this run is DiLoCo over FSDP \\(shard_group 2, 2 ranks"),
             (two, {}, "this run is another sync"), ({}, two, "written by another sync"))
    for saved, mine, match in cases:
        with pytest.raises(KeelError, match=match) as e:
            same_layout(saved, mine)
        assert e.value.field == "distributed.shard_group" and "\n" not in str(e.value)


# ---- one process -------------------------------------------------------------------------------

def test_diloco_outer_step_is_nesterov_sgd_on_the_pseudo_gradient():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    sync = DiLoCo(lin, Comm(World(), torch.device("cpu")), DistributedConfig(sync="diloco", inner_steps=2, outer_lr=0.5,
                                                                               outer_momentum=0.9))
    for step, local in ((1, [0.0, 0.0]), (2, [0.0, 1.0])):
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([local]))
        sync.after_step(step, final=False)
    # Step 1 is not a sync. Step 2: delta = [1, 2] - [0, 1] = [1, 1]; buf = delta; nesterov
    # update = delta + 0.9 * buf = [1.9, 1.9]; w = [1, 2] - 0.5 * 1.9 = [0.05, 1.05].
    assert torch.allclose(lin.weight, torch.tensor([[0.05, 1.05]]))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.05, 0.05]]))
    sync.after_step(3, final=True)  # the last step always syncs
    # delta = [0, 1]; buf = 0.9 * [1, 1] + [0, 1] = [0.9, 1.9]; update = [0, 1] + 0.9 * buf = [0.81, 2.71]
    assert torch.allclose(lin.weight, torch.tensor([[0.05 - 0.405, 1.05 - 1.355]]))
    tensors, _ = sync.state()
    assert torch.allclose(tensors["momentum.0"], torch.tensor([[0.9, 1.9]]))


def test_int8_pseudo_gradients_round_to_half_a_step_of_each_tensors_scale():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sync = DiLoCo(model, Comm(World(), torch.device("cpu")), DistributedConfig(sync="diloco", compress="int8"))
    vec = torch.randn(sum(p.numel() for p in sync.params), generator=torch.Generator().manual_seed(0))
    vec[:12] *= 100  # the first tensor's scale must not coarsen the others
    out = sync.average(vec)
    for chunk, orig in zip(out.split([p.numel() for p in sync.params]), vec.split([p.numel() for p in sync.params])):
        assert (chunk - orig).abs().max() <= orig.abs().max() / 127 / 2 + 1e-6


def test_one_process_sends_nothing_and_keeps_the_plain_checkpoint_layout():
    comm = Comm(World(), torch.device("cpu"))
    t = torch.ones(10)
    comm.all_reduce(t, "grads")
    assert t.tolist() == [1.0] * 10 and comm.take_step() == {"comm_bytes": 0, "comm_s": 0.0}
    tensors, meta = {"model": {"w": t}, "rng": {"torch_cpu": t}}, {"step": 3, "rng": {"python": 1}}
    assert gather_state(tensors, meta, Sync.rank_local, comm) == (tensors, meta)
    assert rank_state(tensors, meta, Sync.rank_local, 0, 1) == (tensors, meta)


def test_rank_state_takes_its_own_parts_and_refuses_another_world_size():
    tensors = {"model": {"w": 1}, "rng@0": {"s": 0}, "rng@1": {"s": 1}}
    meta = {"step": 4, "world_size": 2, "data@0": {"cursor": 3}, "data@1": {"cursor": 7}}
    t, m = rank_state(tensors, meta, ("rng", "data"), 1, 2)
    assert t == {"model": {"w": 1}, "rng": {"s": 1}} and m == {"step": 4, "world_size": 2, "data": {"cursor": 7}}
    with pytest.raises(KeelError, match="written by 2 rank"):
        rank_state(tensors, meta, ("rng", "data"), 0, 4)


def test_faults_can_name_a_rank():
    assert parse("kill@step=5@rank=1,nan_grad@step=2") == [Fault("kill", 5, 1), Fault("nan_grad", 2, None)]
    assert Fault("kill", 5, 1).key == "kill@step=5@rank=1"
    with pytest.raises(KeelError, match="rank=R"):
        parse("kill@step=5@node=1")


@pytest.mark.parametrize("changes, match", [({"sync": "allreduce"}, "unknown sync"), ({"inner_steps": 0}, "inner_steps"),
                                            ({"outer_momentum": 1.0}, "outer_momentum"), ({"compress": "fp8"}, "compress"),
                                            ({"link_gbps": -1}, "link_gbps")])
def test_distributed_config_rejects_bad_values(changes, match):
    with pytest.raises(KeelError, match=match):
        DistributedConfig(**changes)


# ---- torchrun -m keel: a rank dies, torchrun restarts the group, the run resumes exactly ---------

RECIPE = """task: arithmetic
task_options: {digits: 1}
steps: 6
prompts_per_step: 4
group_size: 4
max_new_tokens: 12
resilience: {checkpoint_every: 2}
distributed: {sync: diloco, inner_steps: 3}
"""


def killed_and_whole(tmp_path, recipe: str, fault: str) -> Path:
    """`torchrun -m keel rl` on 2 ranks with `recipe`, uninterrupted and with `fault` (a rank
    killed) under --max-restarts 1: both end with the same weights and metrics. The killed run's folder."""
    from keel.models import save_model
    from keel.train.loop import TIMING_KEYS

    save_model(*worker.model(), tmp_path / "tiny")
    (tmp_path / "r.yaml").write_text(recipe)
    common = ["-m", "keel", "rl", "--model", "tiny", "--recipe", "r.yaml", "--device", "cpu"]
    torchrun(*common, "--out", "whole", cwd=tmp_path)
    torchrun(*common, "--out", "killed", "--inject", fault, cwd=tmp_path, extra=["--max-restarts", "1"])

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    a, b = load_file(whole / "model/model.safetensors"), load_file(killed / "model/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS | {"comm_s"}} for r in rows]
    assert strip(read_jsonl(whole / "metrics.jsonl")) == strip(read_jsonl(killed / "metrics.jsonl"))
    assert [e["fault"] for e in read_jsonl(killed / "rank1/events.jsonl") if e["event"] == "fault_injected"] == [fault]
    return killed


def test_killed_fsdp_rank_restarts_and_resumes_from_its_shards_to_the_same_weights(tmp_path):
    """RL under sync: fsdp (rollouts on the gathered copy, DCP sharded checkpoints): rank 1 dies
    after step 3, torchrun restarts the group, every rank reloads its own shards of step 2."""
    recipe = RECIPE.replace("steps: 6", "steps: 4").replace("distributed: {sync: diloco, inner_steps: 3}",
                                                             "distributed: {sync: fsdp}")
    killed = killed_and_whole(tmp_path, recipe, "kill@step=3@rank=1")
    assert [e["step"] for e in read_jsonl(killed / "events.jsonl") if e["event"] == "resume"] == [2]
    shards = sorted(p.name for p in (killed / "checkpoints/00000004/dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own


def test_killed_rank_of_diloco_over_fsdp_resumes_from_its_shards_to_the_same_weights(tmp_path):
    """RL under DiLoCo over FSDP, one group of 2 ranks (rollouts on the group's gathered weights,
    the KL reference sharded as the model, DCP checkpoints): rank 1 dies after step 5, torchrun
    restarts the group, every rank reloads its shards of step 4 (between syncs, H = 3) and the
    outer state. (Two groups: test_diloco_over_fsdp_checkpoints_resume_exactly_with_each_groups_own_model.)"""
    from keel.resilience.checkpoint import ShardReader

    recipe = RECIPE.replace("inner_steps: 3}", "inner_steps: 3, shard_group: 2}") + "beta: 0.04\n"
    killed = killed_and_whole(tmp_path, recipe, "kill@step=5@rank=1")
    assert [e["step"] for e in read_jsonl(killed / "events.jsonl") if e["event"] == "resume"] == [4]
    keys = ShardReader(killed / "checkpoints/00000004/dcp").read_metadata().state_dict_metadata
    assert {"group0.model.lm_head.weight", "ref.lm_head.weight", "sync.global.0", "sync.momentum.0"} <= set(keys)


def test_killed_rank_restarts_and_resumes_to_the_same_weights(tmp_path):
    killed = killed_and_whole(tmp_path, RECIPE, "kill@step=5@rank=1")
    assert [e["step"] for e in read_jsonl(killed / "events.jsonl") if e["event"] == "resume"] == [4]
    # Step 4 is between DiLoCo syncs (H = 3): each rank's own weights are in the checkpoint.
    saved = load_file(killed / "checkpoints/00000004/tensors.safetensors")
    local = [k for k in saved if k.startswith("model@1/")]
    assert local and any(not torch.equal(saved[k], saved[k.replace("@1/", "@0/")]) for k in local)
    assert any(k.startswith("sync/global.") for k in saved)
