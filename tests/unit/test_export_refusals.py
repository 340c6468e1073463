"""`keel export` errors (issue 17 item 7): architectures it cannot export are refused in one line
before the exporter runs (mixture-of-experts), an exporter failure names its underlying cause, and
the export check runs past a sliding window. Sliding-window models export since issue 13
(tests/unit/test_sliding_window_onnx.py)."""

import warnings

import pytest
import torch
import transformers

from keel.engine.backends import TorchBackend
from keel.errors import KeelError
from keel.engine.backends import root_cause
from keel.export.onnx import check_export, export_onnx
from keel.models import build_tokenizer, vocab_extent

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(config_cls, **extra):
    tok = build_tokenizer()
    config = config_cls(vocab_size=vocab_extent(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval(), tok


def saved(tmp_path, model, tok):
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("config_cls, extra, words", [
    (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
     ["mixture-of-experts", "Qwen3MoeForCausalLM", "num_experts=4", "--backend torch"]),
])
def test_unexportable_architectures_are_refused_before_exporting(tmp_path, config_cls, extra, words):
    """Qwen3-MoE used to fail deep in the converter with an empty log tail."""
    model_dir = saved(tmp_path, *tiny(config_cls, **extra))
    with pytest.raises(KeelError) as e:
        export_onnx(model_dir, tmp_path / "onnx")
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "onnx").exists()


def test_dense_models_are_not_refused():
    from keel.export.onnx import export_refusal

    for config_cls in (transformers.Qwen3Config, transformers.LlamaConfig, transformers.MistralConfig,
                       transformers.Gemma2Config, transformers.Gemma3TextConfig):
        assert export_refusal(config_cls()) is None, config_cls.__name__


def test_the_export_check_goes_past_the_window_only_where_layers_slide():
    from keel.export.onnx import CHECK_TOKENS, check_length

    assert check_length(transformers.MistralConfig(sliding_window=8)) == 10
    # Qwen2 sets sliding_window but applies it only to layers marked sliding (none by default)
    assert check_length(transformers.Qwen2Config(sliding_window=4096)) == CHECK_TOKENS


def test_export_check_runs_past_the_sliding_window():
    """A graph that is right inside the window and wrong past it (here: full attention standing in
    for a sliding-window model) passed the old 7-token check."""
    windowed, _ = tiny(transformers.MistralConfig, sliding_window=8)
    full, _ = tiny(transformers.MistralConfig, sliding_window=None)
    full.load_state_dict(windowed.state_dict())
    reference, candidate = TorchBackend(windowed, "cpu"), TorchBackend(full, "cpu")
    assert check_export(reference, candidate, prompt_len=7) < 1e-5  # inside the window they agree
    assert check_export(reference, candidate) > 1e-3                 # the default check goes past it


def test_an_exporter_failure_names_its_underlying_cause():
    """The exporter wraps the real cause (an op with no ONNX function) in a ConversionError that
    only says which step failed; keel's one line reported that wrapper and an empty log tail."""

    @torch.library.custom_op("keeltest::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @mystery.register_fake
    def _(x):
        return torch.empty_like(x)

    class Uses(torch.nn.Module):
        def forward(self, x):
            return mystery(x) + 1

    with pytest.raises(Exception) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Uses().eval(), (torch.ones(2, 3),), dynamo=True, verbose=False)
    assert "keeltest" not in str(e.value).splitlines()[0]  # the wrapper's own line does not say why
    cause = root_cause(e.value)
    assert "No ONNX function found" in cause and "keeltest.mystery" in cause and "\n" not in cause
