import time

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
