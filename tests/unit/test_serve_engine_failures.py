"""The continuous-batching engine under failure (issue 17 items 1, 2 and 6): a request whose
sampling or prefill fails ends alone with an error while its neighbours finish; no admitted
request is ever left without an end; the waiting queue is bounded, all or nothing."""

import time

import pytest
import torch

from keel.engine.backends import ListCache
from keel.engine.batching import Engine, QueueFull, Request
from keel.engine.sampler import SamplingParams

POISON = 7  # a prompt starting with this token makes the backend misbehave for that row


class ToyBackend(ListCache):
    """Logits that favour token (last input + 1) % V, so every row's output is known. A row whose
    prompt starts with POISON gets NaN logits (`nan`), or fails any prefill it is in (`fail_prefill`)."""

    name, device, max_context, vocab_size = "toy:cpu:fp32", torch.device("cpu"), 64, 16

    def __init__(self, nan=False, fail_prefill=False):
        self.nan, self.fail_prefill = nan, fail_prefill

    def empty_past(self, batch):
        return [torch.zeros(batch, 1, 0, 1)]

    def forward(self, ids_BS, mask_BT, pos_BS, past, logits_to_keep=0):
        B, S = ids_BS.shape
        if past[0].shape[2]:  # each row's first prompt token, as its cache holds it
            first = past[0][:, 0, -1:, 0]
        else:  # a left-padded prefill: the first real column of each row
            first = ids_BS.gather(1, mask_BT.argmax(1, keepdim=True)).float()
        if S > 1 and self.fail_prefill and bool((first == POISON).any()):
            raise RuntimeError("the backend cannot take this prompt")
        present = [torch.cat([past[0], first.view(B, 1, 1, 1).expand(B, 1, S, 1)], 2)]
        logits = torch.full((B, S, self.vocab_size), -5.0)
        logits.scatter_(2, ((ids_BS + 1) % self.vocab_size).unsqueeze(-1), 5.0)
        if self.nan:
            logits[(first[:, 0] == POISON)] = float("nan")
        return logits, present


def req(prompt, n=4):
    return Request(prompt, SamplingParams(1.0, 1.0, n), torch.Generator().manual_seed(0))


def test_a_row_whose_sampling_fails_fails_alone():
    engine = Engine(ToyBackend(nan=True), eos_id=15, max_batch=4)
    good, bad = req([1, 2]), req([POISON, 2])
    for r in (good, bad):
        engine.submit(r)
    engine.run_until_idle()
    assert bad.finish_reason == "error" and "RuntimeError" in bad.error  # multinomial refuses NaN
    assert good.finish_reason == "length" and len(good.tokens) == 4
    assert engine.stats.failed == 1 and engine.running == 0


def test_a_failing_admission_never_orphans_its_request():
    """The failure path used to finish running and waiting requests only; a request popped from
    the queue and failing while it joined the batch got no end at all (its client hung)."""
    engine = Engine(ToyBackend(fail_prefill=True), eos_id=15, max_batch=4)
    ended = {}
    reqs = [req([1, 2, 3]), req([POISON, 2, 3, 4, 5]), req([4, 5])]
    for r in reqs:
        r.on_done = lambda r: ended.setdefault(id(r), r.finish_reason)
    engine.start()
    try:
        for r in reqs:
            engine.submit(r)
        deadline = time.monotonic() + 5
        while len(ended) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert [ended.get(id(r)) for r in reqs] == ["length", "error", "length"]
    assert "cannot take this prompt" in reqs[1].error


def test_waiting_queue_is_bounded_all_or_nothing():
    engine = Engine(ToyBackend(), eos_id=15, max_batch=1, max_waiting=3)
    engine.submit_all([req([1]), req([2])])
    with pytest.raises(QueueFull, match="max_waiting"):
        engine.submit_all([req([3]), req([4])])  # 2 + 2 > 3: neither is queued
    assert engine.waiting == 2 and engine.stats.refused == 2
    engine.submit(req([3]))
    assert engine.waiting == 3
    # abandoned waiting requests give their places back at the next step, without being run
    for r in list(engine._waiting):
        r.cancel()
    engine.step()
    assert engine.waiting == 0 and engine.stats.cancelled == 3 and engine.stats.admitted == 0
