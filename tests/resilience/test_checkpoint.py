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
