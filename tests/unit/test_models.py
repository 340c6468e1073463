import json
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from keel import vocab
from keel.errors import KeelError
from keel.models import (TAGS, build_tokenizer, init_model, load_model, model_config, render_prompt, save_model,
                         special_ids)


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


def test_qwen3_06b_preset_is_qwen3_0_6b_shape_without_allocating():
    config = model_config("qwen3", preset="0.6b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_size, config.vocab_size, config.max_position_embeddings) == \
        (1024, 28, 16, 8, 128, 3072, 151_936, 40_960)
    assert config.tie_word_embeddings and config.rope_parameters["rope_theta"] == 1e6
    assert not config.use_sliding_window and config.rms_norm_eps == 1e-6
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # Qwen/Qwen3-0.6B's count: 0.44B in the blocks, 0.16B in the (tied) embedding
    assert sum(p.numel() for p in model.parameters()) == 596_049_920
    assert model_config("qwen3", preset="0.6b", max_positions=4096).max_position_embeddings == 4096


def test_preset_errors_name_the_argument(monkeypatch):
    for kwargs, field in [(dict(preset="7b"), "preset"), (dict(arch="llama", preset="0.6b"), "preset"),
                          (dict(preset="0.6b", layers=2), "layers"), (dict(preset="0.6b", hidden=64), "hidden")]:
        with pytest.raises(KeelError) as e:
            init_model(**kwargs)
        assert e.value.field == field, kwargs

    class Huge:  # a tokenizer with more ids than the preset's embedding has rows
        eos_token_id, pad_token_id = 0, None

        def __len__(self):
            return 200_000

        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(KeelError, match="more than preset 0.6b's embedding") as e:
        model_config("qwen3", preset="0.6b", tokenizer=Huge())
    assert e.value.field == "tokenizer"
    # no dashscope: a preset without a tokenizer says how to get Qwen's vocabulary (before allocating)
    monkeypatch.setattr(vocab.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KeelError, match="pip install dashscope") as e:
        init_model(preset="0.6b")
    assert e.value.field == "tokenizer"


def small_tokenizer(eos="</s>", template="{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                                         "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"):
    """A word-level HF tokenizer unlike keel's own: its own eos, no pad, its own chat template."""
    words = ["<unk>", "</s>", "[user]", "[assistant]", "1", "+", "2", "=", "3", "<think>", "</think>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token=eos)
    hf.chat_template = template
    return hf


def test_init_model_cli_builds_around_a_tokenizer_dir(tmp_path, monkeypatch, capsys):
    from keel.cli import main

    small_tokenizer().save_pretrained(tmp_path / "tok")
    monkeypatch.setattr(sys, "argv", ["keel", "init-model", "--tokenizer", str(tmp_path / "tok"), "--arch", "llama",
                                      "--layers", "1", "--hidden", "32", "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and "a 11-token vocabulary" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 1
    assert model.config.vocab_size == 11 and model.config.eos_token_id == model.config.pad_token_id == 1
    assert tok.chat_template == small_tokenizer().chat_template  # kept as given
    loaded, ltok = load_model(tmp_path / "m")
    assert special_ids(ltok) == (1, 1) and ltok.decode(render_prompt(ltok, "1 + 2")) == "[user] 1 + 2 [assistant]"


def test_tokenizer_dir_errors(tmp_path, monkeypatch, capsys):
    from keel.cli import main

    with pytest.raises(KeelError, match="holds no tokenizer") as e:
        init_model(tokenizer=tmp_path / "missing")
    assert e.value.field == "tokenizer"
    small_tokenizer(eos=None).save_pretrained(tmp_path / "no-eos")
    with pytest.raises(KeelError, match="no eos_token") as e:
        init_model(tokenizer=tmp_path / "no-eos")
    assert e.value.field == "tokenizer"
    with pytest.raises(KeelError, match="multiple of 32"):  # the shape is checked before the tokenizer loads
        init_model(hidden=50, tokenizer=tmp_path / "missing")
    monkeypatch.setattr(sys, "argv", ["keel", "init-model", "--out", str(tmp_path / "x"), "--preset", "0.6b",
                                      "--layers", "2"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith("leave layers unset (--layers)")


def test_default_init_model_is_unchanged(tmp_path, monkeypatch, capsys):
    """`keel init-model` without the new flags writes what it always did (the demo's model)."""
    from keel.cli import main

    monkeypatch.setattr(sys, "argv", ["keel", "init-model", "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'm'} (866560 parameters)"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"], config["vocab_size"],
            config["max_position_embeddings"], config["head_dim"]) == ("qwen3", 128, 4, 103, 512, 32)
    model, tok = init_model("qwen3", 4, 128, 0)
    torch.testing.assert_close(model.model.embed_tokens.weight, load_model(tmp_path / "m")[0].model.embed_tokens.weight)


@pytest.mark.parametrize("setting, threshold, expected", [
    (None, "above", False), (None, "at", True), (True, "above", True), (False, "at", False)])
def test_gradient_checkpointing_default_follows_model_size_and_an_explicit_setting_wins(
        monkeypatch, setting, threshold, expected):
    import keel.models as models

    model, _ = init_model("qwen3", layers=2, hidden=64, seed=0)
    params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(models, "CHECKPOINTING_PARAMS", params + 1 if threshold == "above" else params)
    assert models.enable_gradient_checkpointing(model, setting) is expected
    assert all(layer.gradient_checkpointing is expected for layer in model.model.layers)


def test_lora_merge_of_a_state_dict_is_peft_merge_and_leaves_the_model_alone():
    """LoraMerge turns an adapted model's state dict into the plain model's weights: bit for bit
    what peft's merge_and_unload (on a copy) holds, W + alpha / r * B @ A by hand, and the adapted
    model, adapters and base, is not changed."""
    from keel.config import LoraSpec
    from keel.models import LoraMerge, add_lora, lora_base, merged_copy

    model, _ = init_model("qwen3", layers=1, hidden=64, seed=0)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = add_lora(model, LoraSpec(r=4, alpha=8), seed=0)
    merge = LoraMerge(adapted)
    with torch.no_grad():  # B starts at zero: give the adapters something to merge
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    before = {k: v.clone() for k, v in lora_base(adapted).state_dict().items()}
    merged = merge(lora_base(adapted).state_dict())
    want = merged_copy(adapted).state_dict()
    assert merged.keys() == want.keys() == plain.keys()
    assert all(torch.equal(merged[k], want[k]) for k in want)
    q = "model.layers.0.self_attn.q_proj"
    A, B = before[f"{q}.lora_A.default.weight"], before[f"{q}.lora_B.default.weight"]
    assert torch.allclose(merged[f"{q}.weight"], plain[f"{q}.weight"] + 8 / 4 * B @ A, atol=1e-6)
    assert not torch.allclose(merged[f"{q}.weight"], plain[f"{q}.weight"], atol=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in lora_base(adapted).state_dict().items())
