"""Sharded checkpoints under sync: fsdp (torch.distributed.checkpoint), with two real gloo
processes: one torchrun launch (tests/distributed/dcp_worker.py) runs every scenario; the
one-process runs they are compared with, and the one-process checkpoint the launch grows onto
two ranks, run here."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from keel.config import DistributedConfig, ResilienceConfig
from keel.resilience import checkpoint
from keel.resilience.state import load_sharded_state, sharded_state
from keel.runlog import read_jsonl
from keel.train.loop import train_loop
from tests.distributed import dcp_worker, fsdp_worker
from tests.distributed.test_distributed import ROOT, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dcp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    one = dcp_worker.looped(out / "grown", total=2)  # one process, sync: fsdp: the DCP layout too
    shutil.copytree(out / "grown/checkpoints", out / "one_process_checkpoints")
    save_file(dcp_worker.full_state(one), out / "grown_step2.safetensors")
    torchrun("-m", "tests.distributed.dcp_worker", str(out), cwd=ROOT)
    return out


def state(out, name: str, rank: int = 0) -> dict:
    return load_file(out / f"{name}-rank{rank}.safetensors")


def equal(a: dict, b: dict, prefix: str = "") -> bool:
    keys = sorted(k for k in a if k.startswith(prefix))
    assert keys and keys == sorted(k for k in b if k.startswith(prefix))
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_resume_on_the_same_ranks_is_bit_identical_and_ranks_agree(dcp_out):
    whole, resumed = state(dcp_out, "whole"), state(dcp_out, "resumed")
    assert equal(whole, state(dcp_out, "whole", 1))
    assert equal(resumed, whole)  # model and optimizer, stopped at step 2 and resumed (background writes)
    assert [e["step"] for e in read_jsonl(dcp_out / "cut/events.jsonl") if e["event"] == "resume"] == [2]
    assert not [e for e in read_jsonl(dcp_out / "cut/events.jsonl") if e["event"] == "reshard"]


def test_each_rank_writes_its_shards_and_the_manifest_lists_every_file(dcp_out):
    path = dcp_out / "whole/checkpoints/00000004"
    assert checkpoint.verify(path) is None
    files = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json", ".keel-output"}
    assert files == {"tensors.safetensors", "state.json", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"}
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 4 and set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": checkpoint._sha256(path / name), "bytes": (path / name).stat().st_size}
    tensors, saved = checkpoint.read(path)
    assert set(tensors) == {"rng@0", "rng@1"}  # only what differs between ranks is gathered; no weights
    assert saved["trainer"]["world_size"] == 2 and "optimizer" in saved["sharded"]
    # each rank's file holds about half of the model and optimizer (FSDP2 shards dim 0 in two)
    sizes = [(path / f"dcp/__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert abs(sizes[0] - sizes[1]) < 0.2 * sum(sizes)


def test_a_corrupted_shard_falls_back_to_the_previous_checkpoint_and_a_temp_folder_is_ignored(dcp_out):
    events = read_jsonl(dcp_out / "corrupt/events.jsonl")
    (bad,) = [e for e in events if e["event"] == "corrupt_checkpoint"]
    assert bad["path"].endswith("00000004") and bad["problem"] == "dcp/__1_0.distcp fails its checksum"
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    assert equal(state(dcp_out, "corrupt"), state(dcp_out, "whole"))  # steps 3 and 4 taken again
    assert not (dcp_out / "corrupt/checkpoints/.tmp-00000006").exists()  # left by a crash: removed, never loaded


def test_two_ranks_reshard_onto_one_exactly_and_train_on(dcp_out, tmp_path):
    saved = state(dcp_out, "cut_step2")  # what the 2-rank run held at its step-2 checkpoint
    shutil.copytree(dcp_out / "cut/checkpoints/00000002", tmp_path / "run/checkpoints/00000002")
    one = dcp_worker.looped(tmp_path / "run", total=2, resume=True)  # one process loads it, takes no step
    assert one.sync.world.size == 1 and equal(dcp_worker.full_state(one), saved)  # weights and AdamW moments, exactly
    (reshard,) = [e for e in read_jsonl(tmp_path / "run/events.jsonl") if e["event"] == "reshard"]
    assert reshard["saved_world_size"] == 2 and reshard["world_size"] == 1
    assert reshard["restarted"] == ["data"]  # rank 0 keeps its own RNG streams
    assert (one.batches.epoch, one.batches.cursor) == (0, 0)  # this rank's data from the seed
    train_loop(one, tmp_path / "on", ResilienceConfig(), dcp_worker.STEPS, "sft")

    # The same continuation from the same state, loaded without DCP: a fresh one-process trainer
    # given the gathered full state. One process either way: measured equal (gap 0.0).
    ref = fsdp_worker.trainer(DistributedConfig(sync="fsdp"))
    ref.cfg = one.cfg
    targets, meta = sharded_state(ref.model, ref.optimizer, with_optimizer=True)
    for key, value in saved.items():
        group, _, name = key.partition("/")
        if group == "model":
            targets["model"][name].copy_(value)
        else:
            param, _, slot = name.rpartition("/")
            targets["optimizer"][param][slot].copy_(value)
    load_sharded_state(ref.model, ref.optimizer, targets, meta)
    ref.step_idx = 2
    train_loop(ref, tmp_path / "ref", ResilienceConfig(), dcp_worker.STEPS, "sft")
    a, b = dcp_worker.full_state(one), dcp_worker.full_state(ref)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert not equal(a, saved, "model/")  # it trained on


def test_one_rank_reshards_onto_two_exactly_and_trains_on(dcp_out):
    saved = load_file(dcp_out / "grown_step2.safetensors")
    for rank in (0, 1):
        assert equal(state(dcp_out, "grown_loaded", rank), saved)  # weights and AdamW moments, exactly
    (reshard,) = [e for e in read_jsonl(dcp_out / "grown/events.jsonl") if e["event"] == "reshard"]
    assert reshard["saved_world_size"] == 1 and reshard["world_size"] == 2
    grown = state(dcp_out, "grown")
    assert equal(grown, state(dcp_out, "grown", 1)) and not equal(grown, saved, "model/")
    assert all(torch.isfinite(t).all() for t in grown.values())


def test_a_sharded_checkpoint_needs_sync_fsdp(dcp_out, tmp_path):
    from keel.errors import KeelError

    shutil.copytree(dcp_out / "one_process_checkpoints", tmp_path / "run/checkpoints")
    t = fsdp_worker.trainer(DistributedConfig(sync="ddp"))
    with pytest.raises(KeelError, match="sync: fsdp") as e:
        train_loop(t, tmp_path / "run", ResilienceConfig(checkpoint_every=2, resume=True), 2, "sft")
    assert e.value.field == "distributed.sync"
