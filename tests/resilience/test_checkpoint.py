import json
import shutil
import time

import pytest
import torch

from keel.report import goodput
from keel.resilience import checkpoint
from keel.resilience.checkpoint import Checkpointer
from keel.runlog import RunLog, read_jsonl


def tree():
    return {"model": {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3)}, "rng": {"s": torch.tensor([1, 2], dtype=torch.uint8)}}


def test_background_writes_the_same_checkpoint_and_does_not_see_later_updates(tmp_path):
    log = RunLog(tmp_path)
    for mode in ("sync", "async"):
        ckpt = Checkpointer(tmp_path / mode, log, every=1, keep=2, background=mode == "async")
        live = tree()
        ckpt.save(1, live, {"step": 1})
        live["model"]["w"].add_(100)  # the loop moves on while the writer works
        ckpt.wait()
    a, sa = checkpoint.read(checkpoint.listing(tmp_path / "sync")[0])
    b, sb = checkpoint.read(checkpoint.listing(tmp_path / "async")[0])
    assert sa == sb == {"step": 1}
    assert torch.equal(a["model"]["w"], torch.arange(6.0).view(2, 3)) and torch.equal(b["model"]["w"], a["model"]["w"])


def test_keeps_the_newest_and_leaves_no_temp_folders(tmp_path):
    ckpt = Checkpointer(tmp_path / "c", RunLog(tmp_path), every=1, keep=2)
    for step in range(1, 5):
        ckpt.save(step, tree(), {"step": step})
    assert [p.name for p in checkpoint.listing(tmp_path / "c")] == ["00000004", "00000003"]
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".tmp")]


def test_torn_checkpoint_is_skipped(tmp_path):
    log = RunLog(tmp_path)
    ckpt = Checkpointer(tmp_path / "c", log, every=1, keep=5)
    ckpt.save(1, tree(), {"step": 1})
    ckpt.save(2, tree(), {"step": 2})
    (checkpoint.listing(tmp_path / "c")[0] / "manifest.json").unlink()  # killed before the manifest landed
    _, state = checkpoint.read(ckpt.latest_path())
    assert state == {"step": 1}
    events = read_jsonl(tmp_path / "events.jsonl")
    assert any(e["event"] == "corrupt_checkpoint" and "manifest" in e["problem"] for e in events)


def test_due_by_steps_and_by_seconds(tmp_path):
    by_steps = Checkpointer(tmp_path, None, every=3)
    assert [s for s in range(1, 10) if by_steps.due(s)] == [3, 6, 9]
    by_time = Checkpointer(tmp_path, None, seconds=0.05)
    assert not by_time.due(1)
    time.sleep(0.06)
    assert by_time.due(2)
    assert not Checkpointer(tmp_path, None).due(5, final=True)


def test_goodput_and_young_daly(tmp_path):
    log = RunLog(tmp_path)
    for step in range(1, 11):
        log.metrics({"stage": "rl", "step": step, "step_s": 1.0})
    log.close()
    events = [{"time": 0.0, "event": "run_start"}, {"time": 1.0, "event": "checkpoint_blocking", "seconds": 0.5},
              {"time": 5.0, "event": "restart"}, {"time": 20.0, "event": "run_end"}]
    (tmp_path / "events.jsonl").write_text("".join(__import__("json").dumps(e) + "\n" for e in events))
    g = goodput(tmp_path)
    assert g["wall_s"] == 20 and g["useful_s"] == 10 and g["checkpoint_s"] == 0.5 and g["lost_s"] == 9.5
    assert g["goodput"] == 0.5 and g["mtbf_s"] == 20  # one fault in 20 s
    assert abs(g["recommended_interval_s"] - (2 * 20 * 0.5) ** 0.5) < 1e-9
    assert g["recommended_interval_steps"] == round((2 * 20 * 0.5) ** 0.5 / 1.0)
    assert goodput(tmp_path, mtbf_hours=1)["mtbf_s"] == 3600


# ----------------------------------------------------------------------------- what verification requires (issue 17, item 11)


def two_checkpoints(tmp_path):
    """Checkpoints of steps 1 and 2; the log the Checkpointer reports to."""
    log = RunLog(tmp_path)
    ckpt = Checkpointer(tmp_path / "c", log, every=1, keep=5)
    ckpt.save(1, tree(), {"step": 1})
    ckpt.save(2, tree(), {"step": 2})
    return ckpt, ckpt.folder / "00000002"


def rewrite_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def entry(path):
    return {"sha256": checkpoint._sha256(path), "bytes": path.stat().st_size}


def corrupt_weights_and_list_nothing(path):
    with open(path / "tensors.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\xde\xad" * 8)
    rewrite_manifest(path, lambda m: m.update(files={}))


def list_only_the_state(path):
    rewrite_manifest(path, lambda m: m["files"].pop("tensors.safetensors"))


def add_a_file(path):
    (path / "extra.bin").write_bytes(b"x")


def link_the_weights_outside(path):
    outside = path.parents[1] / "outside.safetensors"
    (path / "tensors.safetensors").rename(outside)
    (path / "tensors.safetensors").symlink_to(outside)


def claim_another_step(path):
    rewrite_manifest(path, lambda m: m.update(step=7))


def garbage_state_with_its_hash(path):
    (path / "state.json").write_text("[1, 2]")
    rewrite_manifest(path, lambda m: m["files"].update({"state.json": entry(path / "state.json")}))


def garbage_tensors_with_their_hash(path):
    (path / "tensors.safetensors").write_bytes(b"\xff" * 64)
    rewrite_manifest(path, lambda m: m["files"].update({"tensors.safetensors": entry(path / "tensors.safetensors")}))


@pytest.mark.parametrize("tamper", [corrupt_weights_and_list_nothing, list_only_the_state, add_a_file,
                                    link_the_weights_outside, claim_another_step, garbage_state_with_its_hash,
                                    garbage_tensors_with_their_hash])
def test_any_bad_checkpoint_falls_back_to_the_previous_and_is_logged(tmp_path, tamper):
    ckpt, newest = two_checkpoints(tmp_path)
    tamper(newest)
    assert checkpoint.verify(newest) is not None
    found = ckpt.latest_path()
    assert found == ckpt.folder / "00000001" and checkpoint.read(found)[1] == {"step": 1}
    ckpt.log.close()
    (event,) = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "corrupt_checkpoint"]
    assert event["path"] == str(newest)


def test_a_manifest_naming_a_file_outside_the_folder_is_rejected_without_looking_at_it(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the password is 12345")
    problems = []
    for right_hash in (True, False):
        ckpt, newest = two_checkpoints(tmp_path / str(right_hash))
        name = "../../../secret.txt"
        assert (newest / name).resolve() == secret
        fake = entry(secret) if right_hash else {"sha256": "0" * 64, "bytes": 3}
        rewrite_manifest(newest, lambda m: m["files"].update({name: fake}))
        assert ckpt.latest_path() == ckpt.folder / "00000001"
        ckpt.log.close()
        events = read_jsonl(tmp_path / str(right_hash) / "events.jsonl")
        problems += [e["problem"] for e in events if e["event"] == "corrupt_checkpoint"]
        assert "secret" not in (tmp_path / str(right_hash) / "events.jsonl").read_text()
    # the same words whether the outside file's hash was right or not: no oracle for its contents
    assert len(problems) == 2 and problems[0] == problems[1], problems


def test_the_step_is_the_folder_name_written_in_full(tmp_path):
    ckpt, _ = two_checkpoints(tmp_path)
    shutil.copytree(ckpt.folder / "00000002", ckpt.folder / "3")  # a valid checkpoint under a short name
    rewrite_manifest(ckpt.folder / "3", lambda m: m.update(step=3))
    found = ckpt.latest_path()
    # the training loop reads folder_name(int(found.name)): that must be the folder found
    assert found.name == checkpoint.folder_name(int(found.name)) == "00000002"
    assert [checkpoint.step_of(p) for p in checkpoint.listing(ckpt.folder)] == [2, 1]
    assert checkpoint.step_of("3") is None and checkpoint.step_of("0000000٣") is None
    assert checkpoint.step_of(ckpt.folder / "00000042") == 42


def test_a_spike_is_a_rise_not_a_fall():
    """A loss falling faster than its window (early SFT) was flagged, rolled back, replayed and
    flagged again: the run never ended (issue 17, found firing spike@step through the CLI)."""
    from keel.resilience.guard import SpikeDetector

    detector = SpikeDetector(zscore=4, window=4, keys=("loss",))
    for loss in (4.63, 4.60, 4.58, 4.60):
        detector.accept({"loss": loss})
    assert detector.is_spike({"loss": 4.45}) is None  # 7 std below: progress
    assert detector.is_spike({"loss": 4.75}) == "loss 4.75 vs mean 4.603 ± 0.0179"


# ----------------------------------------------------------------------------- sharded checkpoints (issue 14, item 3)

def sharded_checkpoints(tmp_path, steps=(1, 2)):
    """Checkpoints in the sharded layout, written by one process through DCP (as sync: fsdp does)."""
    ckpt = Checkpointer(tmp_path / "c", RunLog(tmp_path), every=1, keep=5)
    for step in steps:
        live = tree()
        ckpt.save(step, {"rng": live.pop("rng")}, {"step": step, "sharded": {}}, shards=live)
    return ckpt


def load(path):
    targets = {"model": {k: torch.zeros_like(v) for k, v in tree()["model"].items()}}
    checkpoint.load_shards(path, targets, None)
    return targets


def test_a_sharded_checkpoint_verifies_and_loads_back(tmp_path):
    ckpt = sharded_checkpoints(tmp_path)
    path = ckpt.latest_path()
    assert path.name == "00000002" and checkpoint.verify(path) is None
    assert sorted(json.loads((path / "manifest.json").read_text())["files"]) == [
        "dcp/.metadata", "dcp/__0_0.distcp", "state.json", "tensors.safetensors"]
    assert all(torch.equal(load(path)["model"][k], v) for k, v in tree()["model"].items())
    tensors, state = checkpoint.read(path)
    assert set(tensors) == {"rng"} and state == {"step": 2, "sharded": {}}


def flip_a_shard_byte(path):
    shard = path / "dcp/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))


def add_a_shard_file(path):
    (path / "dcp/__1_0.distcp").write_bytes(b"x")  # not in the manifest


def add_a_file_dcp_does_not_write(path):
    (path / "dcp/notes.txt").write_bytes(b"x")
    rewrite_manifest(path, lambda m: m["files"].update({"dcp/notes.txt": entry(path / "dcp/notes.txt")}))


def drop_the_metadata(path):
    (path / "dcp/.metadata").unlink()
    rewrite_manifest(path, lambda m: m["files"].pop("dcp/.metadata"))


def unshard_the_state(path):
    (path / "state.json").write_text(json.dumps({"step": 2}))
    rewrite_manifest(path, lambda m: m["files"].update({"state.json": entry(path / "state.json")}))


class Boom:
    def __reduce__(self):
        return (print, ("unpickled",))


def metadata_that_runs_code(path):
    import pickle

    (path / "dcp/.metadata").write_bytes(pickle.dumps(Boom()))
    rewrite_manifest(path, lambda m: m["files"].update({"dcp/.metadata": entry(path / "dcp/.metadata")}))


def metadata_that_reaches_os(path):
    """DCP's metadata module imports os: a pickle may name `os` through it."""
    (path / "dcp/.metadata").write_bytes(b"ctorch.distributed.checkpoint.metadata\nos\n.")
    rewrite_manifest(path, lambda m: m["files"].update({"dcp/.metadata": entry(path / "dcp/.metadata")}))


@pytest.mark.parametrize("tamper, problem", [
    (flip_a_shard_byte, "dcp/__0_0.distcp fails its checksum"),
    (add_a_shard_file, "the manifest does not list exactly the checkpoint's files"),
    (add_a_file_dcp_does_not_write, "dcp holds file(s) DCP does not write"),
    (drop_the_metadata, "dcp lacks DCP's .metadata or its shard files"),
    (unshard_the_state, "state.json and the dcp folder disagree on whether the checkpoint is sharded"),
    (metadata_that_runs_code, "unreadable checkpoint (UnpicklingError)"),
    (metadata_that_reaches_os, "unreadable checkpoint (UnpicklingError)")])
def test_a_bad_sharded_checkpoint_falls_back_to_the_previous(tmp_path, tamper, problem, capsys):
    ckpt = sharded_checkpoints(tmp_path)
    tamper(ckpt.folder / "00000002")
    assert ckpt.latest_path() == ckpt.folder / "00000001"
    ckpt.log.close()
    (event,) = [e for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "corrupt_checkpoint"]
    assert event["path"] == str(ckpt.folder / "00000002") and event["problem"] == problem
    assert "unpickled" not in capsys.readouterr().out


def test_a_temp_folder_left_by_a_crash_is_ignored_and_removed(tmp_path):
    ckpt = sharded_checkpoints(tmp_path)
    # killed while writing step 3: a whole-looking copy, and a torn one of the pid-suffixed kind
    shutil.copytree(ckpt.folder / "00000002", ckpt.folder / ".tmp-00000003")
    (ckpt.folder / ".tmp-00000004-123").mkdir()
    (ckpt.folder / ".tmp-notes").mkdir()  # not a name keel gives: not keel's to remove
    assert ckpt.latest_path() == ckpt.folder / "00000002"
    assert sorted(p.name for p in ckpt.folder.iterdir()) == [".tmp-notes", "00000001", "00000002"]


def test_rank_state_reshards_only_when_given_fresh_parts():
    from keel.errors import KeelError
    from keel.resilience.ranks import rank_state

    tensors = {"sync": {}, "rng@0": {"s": 0}, "rng@1": {"s": 1}}
    meta = {"step": 4, "world_size": 2, "data@0": {"cursor": 3}, "data@1": {"cursor": 7}, "rng@0": {"p": 0}, "rng@1": {"p": 1}}
    with pytest.raises(KeelError, match="written by 2 rank"):  # ddp and diloco: refused
        rank_state(tensors, meta, ("rng", "data"), 0, 1)
    fresh = ({"rng": {"s": 9}}, {"data": {"cursor": 0}, "rng": {"p": 9}})
    t, m = rank_state(tensors, meta, ("rng", "data"), 0, 1, fresh)  # 2 -> 1: rank 0's RNG, the seed's data
    assert t == {"sync": {}, "rng": {"s": 0}} and m == {"step": 4, "world_size": 2, "data": {"cursor": 0}, "rng": {"p": 0}}
    plain = ({"rng": {"s": 5}}, {"step": 4, "data": {"cursor": 3}, "rng": {"p": 5}})  # written by one process
    # 1 -> 2: rank 0 keeps the one rank's RNG; rank 1 has none saved and restarts it from the seed
    # (taking rank 0's would give two ranks the same streams); both restart their data.
    t, m = rank_state(*plain, ("rng", "data"), 0, 2, fresh)
    assert t == {"rng": {"s": 5}} and m == {"step": 4, "data": {"cursor": 0}, "rng": {"p": 5}}
    t, m = rank_state(*plain, ("rng", "data"), 1, 2, fresh)
    assert t == {"rng": {"s": 9}} and m == {"step": 4, "data": {"cursor": 0}, "rng": {"p": 9}}


def test_shards_the_metadata_names_must_all_be_there(tmp_path):
    """Ranks on machines without a shared filesystem write their shards where rank 0 cannot see them:
    that checkpoint is refused when written, and when read."""
    ckpt = sharded_checkpoints(tmp_path)
    path = ckpt.folder / "00000002"
    (path / "dcp/__0_0.distcp").rename(tmp_path / "elsewhere.distcp")
    rewrite_manifest(path, lambda m: m["files"].pop("dcp/__0_0.distcp"))
    (path / "dcp/__1_0.distcp").write_bytes(b"x")  # the file pattern holds, with a shard of another rank
    rewrite_manifest(path, lambda m: m["files"].update({"dcp/__1_0.distcp": entry(path / "dcp/__1_0.distcp")}))
    assert checkpoint.verify(path) == "dcp/__0_0.distcp missing (named by DCP's .metadata)"
    from keel.errors import KeelError

    tmp = checkpoint.temp_path(ckpt.folder, 3)
    shutil.copytree(path, tmp)
    with pytest.raises(KeelError, match="filesystem they all share"):
        checkpoint.write(ckpt.folder, 3, {}, {"step": 3, "sharded": {}}, tmp)
    assert checkpoint.step_of(checkpoint.listing(ckpt.folder)[0]) == 2


def test_sharded_state_before_the_first_step_leaves_the_optimizer_untouched():
    """torch creates missing optimizer state by a step of zero gradients (AdamW's step count 1):
    a checkpoint before any applied step must not do that, nor must resuming from it."""
    from keel.resilience.state import load_sharded_state, sharded_state

    lin = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    tensors, meta = sharded_state(lin, opt)
    assert not opt.state and tensors["optimizer"] == {} and meta["param_groups"] is None
    lin(torch.ones(1, 2)).sum().backward()
    opt.step()  # a later step, then a rollback to that checkpoint
    load_sharded_state(lin, opt, tensors, meta)
    assert not opt.state
    filled, filled_meta = sharded_state(lin, opt, with_optimizer=True)  # targets for a checkpoint with moments
    assert float(filled["optimizer"]["weight"]["step"]) == 1 and [g["params"] for g in filled_meta["param_groups"]] == [
        ["weight", "bias"]]
