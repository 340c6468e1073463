import math

import pytest
import torch
import torch.nn.functional as F

from keel.models import init_model
from keel.train.sft import IGNORE, Batches, completion_loss, pack, pad


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


# ----------------------------------------------------------------------------- packing per architecture (issue 17, item 14)


def tiny_family(family: str):
    """A tiny random model of each family keel must train right: RoPE (qwen3, llama), GPT-2 style
    learned positions, learned positions with an offset computed from the attention mask (OPT),
    sliding-window attention (mistral, window 4: the test sequences are longer)."""
    import transformers as T

    torch.manual_seed(0)
    small = dict(vocab_size=40, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    llama_like = dict(small, hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8)
    config = {"qwen3": lambda: T.Qwen3Config(**llama_like),
              "llama": lambda: T.LlamaConfig(**llama_like),
              "qwen2": lambda: T.Qwen2Config(**llama_like),
              "mistral": lambda: T.MistralConfig(**llama_like, sliding_window=4),
              "opt": lambda: T.OPTConfig(**small, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32),
              "gpt2": lambda: T.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=1, eos_token_id=1)}[family]()
    return T.AutoModelForCausalLM.from_config(config).eval()


PAIRS = [([5, 6, 7], [8, 9, 10, 11, 12, 1]), ([13, 14], [15, 16, 17, 1]), ([18, 19, 20, 21], [22, 23, 24, 25, 1])]


def unpacked_loss(model, pairs):
    """The token-weighted mean of each sequence's completion loss, each computed alone."""
    total, count = 0.0, 0
    for prompt, completion in pairs:
        logits = model(torch.tensor([prompt + completion]), use_cache=False).logits[0, len(prompt) - 1:-1]
        total += F.cross_entropy(logits, torch.tensor(completion), reduction="sum").item()
        count += len(completion)
    return total / count


@pytest.mark.parametrize("family, packs", [("qwen3", True), ("qwen2", True), ("llama", True), ("mistral", True),
                                           ("gpt2", True), ("opt", False)])
def test_the_batches_a_model_trains_on_give_its_unpacked_loss(family, packs):
    from keel.models import PACKS_EXACTLY, packing_probe, packs_exactly

    model = tiny_family(family)
    assert packing_probe(model) is packs and packs_exactly(model) is packs  # the table is what is measured
    assert set(PACKS_EXACTLY) == {"qwen3", "qwen2", "llama", "mistral", "gpt2", "opt"}  # each one tested here
    batches = Batches(PAIRS, batch_tokens=25, pad_id=0, seed=0, packed=packs_exactly(model))  # all 24 tokens
    with torch.no_grad():
        loss, n = completion_loss(model, batches.next())
        assert n == 15 and loss.item() == pytest.approx(unpacked_loss(model, PAIRS), abs=1e-5)
        if not packs:  # why OPT is refused: packing it is silently wrong
            wrong, _ = completion_loss(model, pack(PAIRS, row_len=64, pad_id=0))
            assert abs(wrong.item() - unpacked_loss(model, PAIRS)) > 1e-3


def test_pad_gives_one_row_per_sequence_with_a_mask():
    batch = pad([([5, 6], [7, 1]), ([8], [9, 10, 1])], pad_id=0)
    assert batch.input_ids_BT.tolist() == [[5, 6, 7, 1], [8, 9, 10, 1]]
    assert pad([([5], [7, 1]), ([8], [9, 10, 1])], pad_id=0).attention_mask_BT.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    short = pad([([5], [7, 1]), ([8], [9, 10, 1])], pad_id=0)
    assert short.labels_BT.tolist() == [[7, 1, IGNORE, IGNORE], [9, 10, 1, IGNORE]]
    assert short.position_ids_BT.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_an_unknown_architecture_is_measured():
    from keel.models import packs_exactly

    model = tiny_family("opt")
    model.config.model_type = "opt-like"  # not in the table: the probe decides, and says no
    assert packs_exactly(model) is False
    model = tiny_family("llama")
    model.config.model_type = "llama-like"
    assert packs_exactly(model) is True


def test_sft_refuses_to_pack_opt_and_trains_on_padded_batches(capsys):
    import transformers as T

    from keel.config import SFTConfig
    from keel.models import build_tokenizer
    from keel.train.sft import SFTTrainer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = T.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    trainer = SFTTrainer(T.OPTForCausalLM(config), tokenizer,
                         SFTConfig(task_options={"digits": 1}, examples=20, steps=1, batch_tokens=256, device="cpu"))
    assert not trainer.batches.packed
    lines = [line for line in capsys.readouterr().err.splitlines() if "padded batches" in line]
    assert len(lines) == 1 and "OPTForCausalLM" in lines[0]
    row = trainer.step()
    assert math.isfinite(row["loss"]) and "skipped" not in row
