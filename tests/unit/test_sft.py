import torch
import torch.nn.functional as F

from keel.models import init_model
from keel.train.sft import IGNORE, Batches, completion_loss, pack


def test_pack_labels_only_completions_and_restart_positions():
    pairs = [([5, 6, 7], [8, 9, 1]), ([10, 11], [12, 1])]
    batch = pack(pairs, row_len=12, pad_id=0)
    assert batch.input_ids_BT.tolist() == [[5, 6, 7, 8, 9, 1, 10, 11, 12, 1, 0, 0]]
    # label[t] is the token at t+1, kept only where that token belongs to a completion
    assert batch.labels_BT.tolist() == [[IGNORE, IGNORE, 8, 9, 1, IGNORE, IGNORE, 12, 1, IGNORE, IGNORE, IGNORE]]
    assert batch.position_ids_BT.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1]]


def test_pack_starts_a_new_row_when_full():
    pairs = [([2, 3], [4, 1])] * 3
    batch = pack(pairs, row_len=9, pad_id=0)
    assert batch.input_ids_BT.shape == (2, 9)


def test_packed_loss_equals_unpacked_loss():
    """Packing must not let sequences see each other: the packed loss equals the token-weighted
    mean of each sequence's loss computed alone."""
    torch.manual_seed(0)
    model, _ = init_model("qwen3", layers=2, hidden=64, seed=0)
    pairs = [([5, 6, 7], [8, 9, 10, 1]), ([11, 12], [13, 14, 1]), ([15, 16, 17, 18], [19, 1])]
    packed, n = completion_loss(model, pack(pairs, row_len=32, pad_id=0))
    total, count = 0.0, 0
    for prompt, completion in pairs:
        ids = torch.tensor([prompt + completion])
        logits = model(ids).logits[0, len(prompt) - 1:-1]
        total += F.cross_entropy(logits, torch.tensor(completion), reduction="sum").item()
        count += len(completion)
    assert n == count
    assert abs(packed.item() - total / count) < 1e-5


def test_batches_are_seeded_and_cover_every_example_each_epoch():
    pairs = [([i + 2], [i + 3, 1]) for i in range(50)]
    a = Batches(pairs, batch_tokens=30, pad_id=0, seed=1)
    b = Batches(pairs, batch_tokens=30, pad_id=0, seed=1)
    seen = []
    while a.epoch == 0:
        batch = a.next()
        assert torch.equal(batch.input_ids_BT, b.next().input_ids_BT)
        seen += [t for t in batch.input_ids_BT.flatten().tolist()]
    assert set(range(2, 52)) <= set(seen)  # every prompt token (2..51) came by within one epoch
    c = Batches(pairs, batch_tokens=30, pad_id=0, seed=2)
    assert not torch.equal(Batches(pairs, 30, 0, 1).next().input_ids_BT, c.next().input_ids_BT)
