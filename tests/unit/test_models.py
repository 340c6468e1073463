import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from keel.errors import KeelError
from keel.models import TAGS, build_tokenizer, init_model, load_model, render_prompt, save_model, special_ids


def test_tokenizer_is_character_level_with_single_token_tags():
    tok = build_tokenizer()
    text = "<think>12+9=21</think><answer>21</answer>"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len("12+9=21") + len("21") + 4
    assert tok.decode(ids) == text
    for tag in TAGS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
    assert tok.decode(tok.encode("a b\n c", add_special_tokens=False)) == "a b\n c"
    eos, pad = special_ids(tok)
    assert eos != pad and tok.decode([eos] + ids, skip_special_tokens=True) == text


def test_render_prompt_uses_the_chat_template():
    tok = build_tokenizer()
    assert tok.decode(render_prompt(tok, "12+9")) == "12+9\n"


@pytest.mark.parametrize("arch, cls", [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_saved_model_loads_in_plain_transformers(tmp_path, arch, cls):
    model, tok = init_model(arch, layers=2, hidden=64, seed=1)
    save_model(model, tok, tmp_path / "m")
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in (tmp_path / "m").iterdir())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # no keel involved
    assert type(again).__name__ == cls
    ids = torch.tensor([render_prompt(tok, "3+4")])
    torch.testing.assert_close(model(ids).logits, again(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "m").decode(ids[0]) == "3+4\n"


def test_init_is_seeded():
    a, _ = init_model("qwen3", 1, 32, seed=3)
    b, _ = init_model("qwen3", 1, 32, seed=3)
    c, _ = init_model("qwen3", 1, 32, seed=4)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_load_errors_say_what_to_do(tmp_path):
    with pytest.raises(KeelError, match="does not exist.*keel init-model"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeelError, match="no config.json"):
        load_model(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(KeelError, match="never unpickles"):
        load_model(pickled)
    with pytest.raises(KeelError, match="unknown arch"):
        init_model("gpt5")
    with pytest.raises(KeelError, match="multiple of 32"):
        init_model("qwen3", hidden=50)
