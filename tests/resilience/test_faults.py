"""Kill runs, corrupt checkpoints, poison gradients, hang steps: nothing may be lost."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from keel.config import ResilienceConfig, RLConfig, SFTConfig
from keel.models import init_model, load_model, save_model
from keel.resilience import checkpoint
from keel.train.loop import TIMING_KEYS
from keel.rl.trainer import RLTrainer, rl
from keel.runlog import read_jsonl
from keel.train.sft import sft

ROOT = Path(__file__).resolve().parents[2]
TASK = {"digits": 2}
RL_RECIPE = """task: arithmetic
task_options: {digits: 2}
steps: 8
prompts_per_step: 4
group_size: 4
max_new_tokens: 20
updates_per_batch: 2
beta: 0.01
lr: 1.0e-3
resilience: {checkpoint_every: 2, hang_seconds: 20}
"""
SFT_RECIPE = """task: arithmetic
task_options: {digits: 2}
examples: 300
steps: 10
batch_tokens: 512
resilience: {checkpoint_every: 2}
"""


def keel(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "keel", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model SFT'd just enough that RL rewards vary (so RL steps really update)."""
    root = tmp_path_factory.mktemp("base")
    model, tok = init_model("qwen3", layers=2, hidden=64, seed=0)
    torch.set_num_threads(1)
    sft(model, tok, SFTConfig(task_options=TASK, examples=500, steps=80, batch_tokens=2048), root / "sft")
    save_model(model, tok, root / "model")
    (root / "rl.yaml").write_text(RL_RECIPE)
    (root / "sft.yaml").write_text(SFT_RECIPE)
    return root


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_run(a: Path, b: Path):
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra, rb = comparable(read_jsonl(a / "metrics.jsonl")), comparable(read_jsonl(b / "metrics.jsonl"))
    assert len(ra) == len(rb) and ra == rb


@pytest.mark.parametrize("stage, kills", [("rl", (3, 5, 8)), ("sft", (3, 6, 9))])
def test_killed_and_resumed_run_is_bit_identical(base, tmp_path, stage, kills):
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
    assert_same_run(tmp_path / "clean", tmp_path / "killed")
    if stage == "rl":
        report = keel("report", tmp_path / "killed")
        assert report.returncode == 0, report.stderr
        g = json.loads(report.stdout.strip().splitlines()[-1])
        assert g["faults"]["restart"] == len(kills) and g["useful_steps"] == 8 and 0 < g["goodput"] < 1
        assert g["recommended_interval_steps"] >= 1


def _rl_cfg(**resilience):
    return RLConfig(task_options=TASK, steps=6, prompts_per_step=4, group_size=4, max_new_tokens=20,
                    updates_per_batch=2, beta=0.01, lr=1e-3, seed=5,
                    resilience=ResilienceConfig(checkpoint_every=2, **resilience))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(base, tmp_path):
    m, tok = load_model(base / "model")
    rl(m, tok, _rl_cfg(), tmp_path / "clean")
    m, tok = load_model(base / "model")
    rl(m, tok, _rl_cfg(inject="kill@step=0"), tmp_path / "run")  # a spec that never fires
    newest = checkpoint.listing(tmp_path / "run" / "checkpoints")[0]
    assert newest.name == "00000006"
    with open(newest / "tensors.safetensors", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\xff" * 8)
    log = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(log) == 6
    m2, tok = load_model(base / "model")
    trainer = RLTrainer(m2, tok, _rl_cfg(resume=True))
    rows = __import__("keel.train.loop", fromlist=["train_loop"]).train_loop(
        trainer, tmp_path / "run", trainer.cfg.resilience, 6, "rl")
    assert [r["step"] for r in rows] == [5, 6]  # resumed from step 4
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    corrupt = [e for e in events if e["event"] == "corrupt_checkpoint"]
    assert corrupt and corrupt[0]["path"].endswith("00000006") and "checksum" in corrupt[0]["problem"]
    assert comparable(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == comparable(read_jsonl(tmp_path / "clean" / "metrics.jsonl"))
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_nonfinite_gradient_skips_the_update(base, tmp_path):
    m, tok = load_model(base / "model")
    trainer = RLTrainer(m, tok, dataclasses.replace(_rl_cfg(inject="nan_grad@step=2"), updates_per_batch=1))
    from keel.train.loop import train_loop

    seen = {}
    rows = train_loop(trainer, tmp_path, trainer.cfg.resilience, 3, "rl",
                      after_step=lambda row: seen.setdefault(row["step"], [p.detach().clone() for p in m.parameters()]))
    assert rows[1]["skipped"] == "nonfinite" and "skipped" not in rows[0] and "skipped" not in rows[2]
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "skip"] == [2]


def test_spike_rolls_back_and_skips_the_batch(base, tmp_path):
    m, tok = load_model(base / "model")
    cfg = RLConfig(task_options=TASK, steps=7, prompts_per_step=4, group_size=4, max_new_tokens=20, lr=1e-4,
                   seed=6, resilience=ResilienceConfig(checkpoint_every=2, spike_zscore=4, spike_window=4,
                                                       inject="spike@step=5"))
    rows = rl(m, tok, cfg, tmp_path)
    events = read_jsonl(tmp_path / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert "spike" in kinds and "rollback" in kinds
    rollback = next(e for e in events if e["event"] == "rollback")
    assert rollback["step"] == 4
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6, 7]
    assert logged[4].get("skipped") == "spike"
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert rows[-1]["step"] == 7


def test_hang_watchdog_dumps_stacks_and_the_supervisor_restarts(base, tmp_path):
    recipe = tmp_path / "hang.yaml"
    recipe.write_text(RL_RECIPE.replace("steps: 8", "steps: 3").replace("hang_seconds: 20", "hang_seconds: 4"))
    r = keel("rl", "--model", base / "model", "--out", tmp_path / "run", "--recipe", recipe,
             "--inject", "hang@step=2", "--max-restarts", "1")
    assert r.returncode == 0, r.stderr
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    assert [e["exit_code"] for e in events if e["event"] == "restart"] == [3]
    hang = next(e for e in events if e["event"] == "hang")
    stacks = Path(hang["stacks"]).read_text()
    assert "before_update" in stacks and "Thread" in stacks
    assert [row["step"] for row in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_every_state_item_round_trips(base, tmp_path):
    m, tok = load_model(base / "model")
    a = RLTrainer(m, tok, _rl_cfg())
    a.step()
    a.step()
    tensors, state = a.state()
    path = checkpoint.write(tmp_path, a.step_idx, checkpoint.flatten(tensors), {"trainer": state})
    assert checkpoint.verify(path) is None
    m2, _ = load_model(base / "model")
    b = RLTrainer(m2, tok, _rl_cfg())
    t2, s2 = checkpoint.read(path)
    b.load_state(t2, s2["trainer"])
    ta, sa = a.state()
    tb, sb = b.state()
    assert json.dumps(sa, sort_keys=True) == json.dumps(sb, sort_keys=True)
    assert ta.keys() == tb.keys() == {"model", "optimizer", "rng", "ref"}
    for group in ta:
        assert ta[group].keys() == tb[group].keys()
        for k in ta[group]:
            assert torch.equal(ta[group][k], tb[group][k]), (group, k)
    # the live objects continue identically: same next step, same next random numbers
    ra, rb = a.step(), b.step()
    assert {k: v for k, v in ra.items() if k not in TIMING_KEYS} == {k: v for k, v in rb.items() if k not in TIMING_KEYS}


def test_no_checkpoint_to_resume_starts_fresh(base, tmp_path):
    m, tok = load_model(base / "model")
    rows = rl(m, tok, _rl_cfg(resume=True), tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert checkpoint.listing(tmp_path / "checkpoints")[0].name == "00000006"


def test_fault_spec_errors():
    from keel.errors import KeelError
    from keel.resilience.faults import parse

    assert [f.key for f in parse("kill@step=7,nan_grad@step=3,corrupt@latest,hang@step=9")] == [
        "kill@step=7", "nan_grad@step=3", "corrupt@latest", "hang@step=9"]
    with pytest.raises(KeelError, match="unknown fault 'boom'"):
        parse("boom@step=1")
    with pytest.raises(KeelError, match="kill@step=N"):
        parse("kill@7")


# ----------------------------------------------------------------------------- every fault kind from the command line


def sft_recipe(tmp_path, steps, **resilience):
    settings = ", ".join(f"{k}: {v}" for k, v in {"checkpoint_every": 2, "keep": 5, **resilience}.items())
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(SFT_RECIPE.replace("steps: 10", f"steps: {steps}")
                      .replace("resilience: {checkpoint_every: 2}", f"resilience: {{{settings}}}"))
    return recipe


def events_of(run, kind):
    return [e for e in read_jsonl(run / "events.jsonl") if e["event"] == kind]


def test_corrupt_faults_fire_from_the_command_line_and_resume_falls_back(base, tmp_path):
    recipe = sft_recipe(tmp_path, 6)
    clean = keel("sft", "--model", base / "model", "--out", tmp_path / "clean", "--recipe", recipe)
    assert clean.returncode == 0, clean.stderr
    # step 4's checkpoint is corrupted as it is written, then the run dies: it resumes from step 2
    run = tmp_path / "at_step"
    r = keel("sft", "--model", base / "model", "--out", run, "--recipe", recipe,
             "--inject", "corrupt@step=4,kill@step=5", "--max-restarts", "1")
    assert r.returncode == 0, r.stderr
    assert [e["fault"] for e in events_of(run, "fault_injected")] == ["corrupt@step=4", "kill@step=5"]
    (bad,) = events_of(run, "corrupt_checkpoint")
    assert bad["path"].endswith("00000004") and "checksum" in bad["problem"]
    assert [e["step"] for e in events_of(run, "resume")] == [2]
    assert_same_run(tmp_path / "clean", run)
    # corrupt@latest hits the first checkpoint: with nothing older, the restart starts afresh
    run = tmp_path / "latest"
    r = keel("sft", "--model", base / "model", "--out", run, "--recipe", recipe,
             "--inject", "corrupt@latest,kill@step=3", "--max-restarts", "1")
    assert r.returncode == 0, r.stderr
    assert [e["fault"] for e in events_of(run, "fault_injected")] == ["corrupt@latest", "kill@step=3"]
    (bad,) = events_of(run, "corrupt_checkpoint")
    assert bad["path"].endswith("00000002") and "checksum" in bad["problem"]
    assert not events_of(run, "resume") and len(events_of(run, "restart")) == 1
    assert_same_run(tmp_path / "clean", run)


def test_gradient_faults_fire_from_the_command_line(base, tmp_path):
    # z 100: only the injected spike (grad norm x 1e4) trips it, not a small model's ordinary jumps
    recipe = sft_recipe(tmp_path, 7, spike_zscore=100, spike_window=4)
    run = tmp_path / "run"
    r = keel("sft", "--model", base / "model", "--out", run, "--recipe", recipe,
             "--inject", "nan_grad@step=2,spike@step=6")
    assert r.returncode == 0, r.stderr
    assert [e["fault"] for e in events_of(run, "fault_injected")] == ["nan_grad@step=2", "spike@step=6"]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [row.get("skipped") for row in rows] == [None, "nonfinite", None, None, None, "spike", None]
    assert [e["step"] for e in events_of(run, "spike")] == [6] and [e["step"] for e in events_of(run, "rollback")] == [4]
    weights = load_file(run / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_tampered_checkpoint_is_skipped_on_resume_through_the_training_loop(base, tmp_path):
    """A manifest that lists no files over corrupted weights, and a valid checkpoint under a short
    folder name ("5"): the resume uses step 2's checkpoint, as events.jsonl says."""
    from keel.train.loop import train_loop
    from keel.train.sft import SFTTrainer

    cfg = SFTConfig(task_options=TASK, examples=300, steps=4, batch_tokens=512,
                    resilience=ResilienceConfig(checkpoint_every=2, keep=5))
    m, tok = load_model(base / "model")
    sft(m, tok, cfg, tmp_path)
    folder = tmp_path / "checkpoints"
    import shutil

    shutil.copytree(folder / "00000004", folder / "5")
    manifest = json.loads((folder / "5" / "manifest.json").read_text())
    (folder / "5" / "manifest.json").write_text(json.dumps({**manifest, "step": 5}))
    with open(folder / "00000004" / "tensors.safetensors", "r+b") as f:
        f.seek(4000)
        f.write(b"\xde\xad\xbe\xef" * 4)
    (folder / "00000004" / "manifest.json").write_text(json.dumps({"step": 4, "files": {}}))
    m2, tok = load_model(base / "model")
    trainer = SFTTrainer(m2, tok, dataclasses.replace(cfg, resilience=ResilienceConfig(checkpoint_every=2, resume=True)))
    rows = train_loop(trainer, tmp_path, trainer.cfg.resilience, 4, "sft")
    assert [r["step"] for r in rows] == [3, 4]
    assert [e["path"][-8:] for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "corrupt_checkpoint"] == ["00000004"]
    assert [e["step"] for e in read_jsonl(tmp_path / "events.jsonl") if e["event"] == "resume"] == [2]
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)  # the resumed run ends where the uninterrupted one did
