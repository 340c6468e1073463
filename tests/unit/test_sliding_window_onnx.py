"""Sliding-window and soft-capped models on ONNX Runtime (issue 13 item 1): Mistral, Gemma 2
(sliding and full layers alternating, soft-capped attention scores and logits) and Gemma 3 text.

`keel export` (and so `keel parity` on onnxruntime) refused every sliding-window model: the first
traced graph built transformers' cache from the model's config, which trims sliding layers to their
window, and ONNX Runtime then failed at any length when the window was shorter than the traced
example ("invalid expand shape"), or rows failed to join once past it. The cache wrapper
(engine/backends.KVModel) has since kept every column and left the window to transformers' mask,
which traces with dynamic lengths; the refusal outlived the cause."""

import copy

import pytest
import torch
import transformers

from keel.engine.backends import OrtBackend, TorchBackend
from keel.engine.batching import generate
from keel.engine.sampler import SamplingParams
from keel.export.onnx import export_onnx
from keel.models import build_tokenizer, vocab_extent

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW = 4
PROMPT_LENGTHS = (9, 3)  # two left-padded rows of different lengths; with NEW tokens both pass the window
NEW = 8
ARCHITECTURES = {
    "mistral": (transformers.MistralConfig, {}),
    # Weights large enough that the caps change this tiny model's scores (asserted below): at the
    # default initializer_range (0.02) an attention cap of 2 changes no logit by more than 1e-7.
    "gemma2": (transformers.Gemma2Config, dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                               initializer_range=0.2)),
    "gemma3": (transformers.Gemma3TextConfig, dict(final_logit_softcapping=3.0,
                                                   layer_types=["sliding_attention", "full_attention"])),
}


def tiny(name, **override):
    config_cls, extra = ARCHITECTURES[name]
    tok = build_tokenizer()
    config = config_cls(vocab_size=vocab_extent(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        **{"sliding_window": WINDOW, **extra, **override})
    torch.manual_seed(0)
    # The reference runs attention eagerly: SDPA has no soft cap (transformers < 5.20 loads Gemma 2
    # with SDPA and drops the cap; test_soft_capped_attention_runs_eagerly below)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval(), tok


class Recorded:
    """A backend that keeps the logits the engine samples from at each step (each row's last column)."""

    def __init__(self, backend):
        self.backend, self.steps_BV = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def forward(self, ids_BS, mask_BT, pos_BS, past, logits_to_keep=0):
        logits_BSV, present = self.backend.forward(ids_BS, mask_BT, pos_BS, past, logits_to_keep)
        self.steps_BV.append(logits_BSV[:, -1].clone())
        return logits_BSV, present


@torch.no_grad()
def hf_logits(model, seq):
    """The HF model's logits over the whole sequence at once: no cache, no padding."""
    return model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_export_and_both_backends_give_the_models_logits_past_the_window(tmp_path, name):
    model, tok = tiny(name)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    meta = export_onnx(tmp_path / "model", tmp_path / "onnx")  # refused before: "cannot export sliding-window"
    assert meta["check_max_abs_logit_diff"] < 1e-4

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab_extent(tok), (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    params = SamplingParams(temperature=0, max_new_tokens=NEW)
    tokens = {}
    for backend in (OrtBackend(tmp_path / "onnx"), TorchBackend(copy.deepcopy(model), "cpu")):
        recorded = Recorded(backend)
        # eos_id -1: no row ends early, so both rows stay in the batch, in prompt order, at every step
        reqs = generate(recorded, prompts, params, eos_id=-1)
        assert [r.error for r in reqs] == [None, None]
        tokens[backend.name] = [r.tokens for r in reqs]
        assert len(recorded.steps_BV) == NEW  # one prefill, then a decode step per further token
        for row, (prompt, req) in enumerate(zip(prompts, reqs)):
            reference_SV = hf_logits(model, prompt + req.tokens)
            for step, logits_BV in enumerate(recorded.steps_BV):  # step k predicts token k
                position = len(prompt) - 1 + step
                torch.testing.assert_close(logits_BV[row], reference_SV[position], atol=1e-4, rtol=1e-4,
                                           msg=f"{backend.name}, row {row}, position {position}")
    assert tokens["onnxruntime:cpu:fp32"] == tokens["torch:cpu:fp32"]

    # Guards: the window changes these logits past the window (and Gemma 2's attention cap changes
    # them), so matching the reference means the graph applied them.
    seq = prompts[0] + tokens["torch:cpu:fp32"][0]
    reference_SV = hf_logits(model, seq)

    def change_S(**override):
        other, _ = tiny(name, **override)
        other.load_state_dict(model.state_dict())
        return (hf_logits(other, seq) - reference_SV).abs().amax(-1)

    unwindowed_S = change_S(sliding_window=64)
    assert unwindowed_S[:WINDOW].max() < 1e-5 and unwindowed_S[WINDOW:].max() > 1e-3
    if name == "gemma2":
        assert change_S(attn_logit_softcapping=None).max() > 1e-3


def test_soft_capped_attention_runs_eagerly():
    """A Gemma 2 model on SDPA, as transformers before 5.20 loads it (keel's load_model included):
    SDPA has no cap, and dropped it silently there (5.25 raises instead). The backends switch such a
    model to eager attention, and give the capped model's logits."""
    model, tok = tiny("gemma2")
    on_sdpa = copy.deepcopy(model)
    on_sdpa.config._attn_implementation = "sdpa"  # what from_pretrained picks in transformers < 5.20
    backend = TorchBackend(on_sdpa, "cpu")
    assert on_sdpa.config._attn_implementation == "eager"
    seq = torch.randint(3, vocab_extent(tok), (2 * WINDOW,), generator=torch.Generator().manual_seed(3)).tolist()
    ids = torch.tensor([seq])
    logits_SV, _ = backend.forward(ids, torch.ones_like(ids), torch.arange(len(seq))[None], backend.empty_past(1))
    torch.testing.assert_close(logits_SV[0], hf_logits(model, seq), atol=1e-5, rtol=1e-5)

