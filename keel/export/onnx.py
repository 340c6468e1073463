"""Export an HF causal LM to ONNX with KV-cache inputs and outputs, for ONNX Runtime on any
execution provider (CPU, CUDA, CANN for Ascend, OpenVINO, ...).

One graph serves prefill and decode: inputs `input_ids` [B, S], `attention_mask` [B, T],
`position_ids` [B, S] and `past.{i}.key|value` [B, H, T_past, D] (T_past = 0 at prefill); outputs
`logits` [B, S, V] and `present.{i}.key|value` [B, H, T_past + S, D]. The traced module is
`keel.engine.backends.KVModel`, the very function the torch backend runs.

The export directory holds model.onnx (+ model.onnx.data when the weights are large), the
tokenizer, the HF config, and keel_onnx.json: shapes, dtype, and the max |logit| difference to
torch measured right after export on a prefill and a decode step.

dtype int8 or int4 writes the rollout sampler's graph (`keel.engine.backends.rollout_graph`: matmul
weights quantized by ONNX Runtime's own tools, fp32 activations) with its weights inside, so that
`keel serve` and `keel parity` run exactly what `rollout: {backend: onnxruntime, dtype: int8}`
samples with; its check is against fp32 torch, so it measures the quantization.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from keel.errors import KeelError
from keel.io import check_out_folder, publish_folder, temp_folder
from keel.engine.backends import (ONNX_FILE, ONNX_META, OrtBackend, TorchBackend, check_dtype, embed_weights,
                                  graph_meta, rollout_graph, trace_onnx)
from keel.engine.quantize import QUANTIZED
from keel.models import load_model, sliding_window

ONNX_KIND = "onnx"  # the marker keel.io puts in export folders
CHECK_TOKENS = 7  # prompt length of the export check (more for a sliding-window model: past its window)
# config fields that give a model routed experts (Qwen3-MoE, OLMoE: num_experts; Mixtral, GPT-OSS:
# num_local_experts; DeepSeek: n_routed_experts)
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def export_refusal(config) -> str | None:
    """Why keel cannot export this architecture (one line), or None. Checked before exporting:
    these fail deep inside the exporter. Sliding-window and soft-capped models (Mistral, Gemma 2
    and 3) export: `check_export` runs past the window (tests/unit/test_sliding_window_onnx.py)."""
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    experts = next((f"{f}={getattr(config, f)}" for f in _EXPERT_FIELDS if (getattr(config, f, None) or 0) > 0), None)
    if experts:
        return (f"keel export cannot export mixture-of-experts models ({arch}, {experts}): the exporter has no ONNX "
                "function for transformers' grouped expert matmul; serve it with --backend torch")
    return None


def check_length(config) -> int:
    """Prompt tokens for the export check: past the sliding window (by 2), where a graph traced
    inside it would first go wrong."""
    window = sliding_window(config) if config is not None else None
    return max(CHECK_TOKENS, window + 2) if window else CHECK_TOKENS


# What `export_onnx` tells its `on_phase` as it goes (keel.runlog.phases shows them).
EXPORT_PHASES = ["loading the model", "tracing it and converting to ONNX (most of the time)",
                 "checking the graph against torch"]


def export_onnx(model_dir: str | Path, out: str | Path, dtype: str = "fp32", check: bool = True,
                overwrite: bool = False, on_phase=lambda name: None) -> dict:
    """Write `out` as an ONNX export directory (atomically); returns its keel_onnx.json contents.
    An existing `out` is replaced only when it is an export keel wrote, or with `overwrite`; never
    when it is (or holds) `model_dir`. `on_phase(name)` is called as each of EXPORT_PHASES starts."""
    torch_dtype = torch.float32 if dtype in QUANTIZED else check_dtype(dtype)
    check_out_folder(out, ONNX_KIND, overwrite, inputs=(model_dir,))  # before minutes of exporting
    on_phase(EXPORT_PHASES[0])
    model, tokenizer = load_model(model_dir)
    refusal = export_refusal(model.config)
    if refusal:
        raise KeelError(refusal, field="model")
    model = model.to(torch_dtype).eval()

    out = Path(out)
    tmp = temp_folder(out, ONNX_KIND, overwrite, inputs=(model_dir,))
    try:
        on_phase(EXPORT_PHASES[1])
        big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
        if dtype in QUANTIZED:  # the rollout sampler's graph, its weights inside
            import onnx

            meta, proto, _, weights = rollout_graph(model, dtype)
            embed_weights(proto, weights)
            onnx.save(proto, str(tmp / ONNX_FILE), save_as_external_data=big, location=ONNX_FILE + ".data")
        else:
            program = trace_onnx(model, str(model_dir), "model")
            program.save(str(tmp / ONNX_FILE), external_data=big)
            meta = graph_meta(model, dtype)
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        meta = {**meta, "source": str(Path(model_dir).resolve())}
        (tmp / ONNX_META).write_text(json.dumps(meta, indent=1))
        if check and dtype != "bf16":
            on_phase(EXPORT_PHASES[2])
            # int8 and int4 against fp32 torch: the number is what the quantization changes
            reference = TorchBackend(model, "cpu", "fp32" if dtype in QUANTIZED else dtype)
            meta["check_max_abs_logit_diff"] = check_export(reference, OrtBackend(tmp))
            (tmp / ONNX_META).write_text(json.dumps(meta, indent=1))
        publish_folder(tmp, out, ONNX_KIND, overwrite, inputs=(model_dir,))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


@torch.no_grad()
def check_export(reference, candidate, prompt_len: int | None = None, seed: int = 0) -> float:
    """Max |logit difference| between two backends over a prefill of `prompt_len` tokens (default:
    `check_length` of the reference's model, past any sliding window) and one decode step on its
    cache (each backend feeds its own cache)."""
    if prompt_len is None:
        prompt_len = check_length(getattr(getattr(reference, "model", None), "config", None))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, reference.vocab_size, (1, prompt_len), generator=g)
    mask, pos = torch.ones(1, prompt_len, dtype=torch.long), torch.arange(prompt_len)[None]
    worst = 0.0
    ref_logits, ref_past = reference.forward(ids, mask, pos, reference.empty_past(1))
    can_logits, can_past = candidate.forward(ids, mask, pos, candidate.empty_past(1))
    worst = max(worst, float((ref_logits - can_logits).abs().max()))
    nxt = ref_logits[:, -1:].argmax(-1)
    mask2, pos2 = torch.ones(1, prompt_len + 1, dtype=torch.long), torch.tensor([[prompt_len]])
    ref_logits, _ = reference.forward(nxt, mask2, pos2, ref_past)
    can_logits, _ = candidate.forward(nxt, mask2, pos2, can_past)
    return max(worst, float((ref_logits - can_logits).abs().max()))
