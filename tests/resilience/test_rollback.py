"""The training loop's spike rollback, driven by a scripted trainer: which steps spike is fixed in
advance, so the loop's own bookkeeping is what is tested."""

from __future__ import annotations

import torch

from keel.config import DistributedConfig, ResilienceConfig, SFTConfig
from keel.distributed import make_sync
from keel.runlog import read_jsonl
from keel.train.loop import train_loop


class ScriptedTrainer:
    """Loss 1.0 every step, except the steps in `spiking`, whose loss is 100: a spike whenever it is
    learned from. The state is just the step count, so a rollback is exact."""

    def __init__(self, spiking: set[int]):
        self.model = torch.nn.Linear(1, 1)
        self.sync = make_sync(DistributedConfig(), self.model, torch.device("cpu"))
        self.cfg = SFTConfig()  # the loop reads its report_to
        self.spiking, self.step_idx, self.calls = spiking, 0, 0

    def step(self, injector=None, apply: bool = True) -> dict:
        self.calls += 1
        assert self.calls < 100, "the loop keeps rolling back: it never ends"
        self.step_idx += 1
        loss = 100.0 if apply and self.step_idx in self.spiking else 1.0 + 0.01 * (self.step_idx % 2)
        return {"stage": "sft", "step": self.step_idx, "loss": loss}

    def state(self):
        return {"model": {"marker": torch.zeros(1)}}, {"step_idx": self.step_idx}

    def load_state(self, tensors, state) -> None:
        self.step_idx = state["step_idx"]


def test_two_spikes_after_one_checkpoint_are_both_skipped_and_the_run_ends(tmp_path):
    # Steps 5 and 6 both spike and the newest checkpoint is step 4's. A rollback used to reset the
    # skipped steps to the checkpoint's: skipping 6 forgot 5, skipping 5 forgot 6, for ever.
    trainer = ScriptedTrainer(spiking={5, 6})
    res = ResilienceConfig(checkpoint_every=4, spike_zscore=4, spike_window=3)
    rows = train_loop(trainer, tmp_path, res, 8, "sft")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r.get("skipped") for r in rows] == [None] * 4 + ["spike", "spike", None, None]
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "rollback"] == [4, 4]
