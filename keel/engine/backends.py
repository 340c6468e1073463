"""Inference backends behind one small interface: a forward step over a flat KV cache.

A backend is anything with `forward(ids_BS, mask_BT, pos_BS, past) -> (logits_BSV, present)`:

- `ids_BS`   the new tokens (S = prompt length at prefill, 1 at decode), int64;
- `mask_BT`  1/0 over the T = past + S columns (left padding is 0), int64;
- `pos_BS`   each new token's position, counted from its row's first real token, int64;
- `past`     the KV cache as a flat list [k0, v0, k1, v1, ...] of [B, H, T_past, D] tensors
             (`empty_past(B)` at prefill); `present` is the same list with S columns appended.

Logits come back as fp32 torch tensors on the backend's device, whatever the backend computes in.
The cache is opaque to callers except for two facts the batching engine relies on: dim 0 is the
batch and dim 2 is time, so rows can be joined, padded on the left with zeros and dropped.

Two backends: `TorchBackend` (any HF causal LM on any torch device, npu included, in fp32, bf16 or
fp16) and `OrtBackend` (an exported ONNX graph on any ONNX Runtime execution provider). The sampler
and the stop rules are not here: they are the rollout engine's, applied by `keel.engine.batching`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from keel.errors import KeelError
from keel.engine.kvcache import cache_kwarg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ONNX_FILE, ONNX_META = "model.onnx", "keel_onnx.json"
# Short names for ONNX Runtime execution providers; a full name (e.g. "ROCMExecutionProvider") works too.
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "cann": "CANNExecutionProvider", "openvino": "OpenVINOExecutionProvider", "dml": "DmlExecutionProvider",
             "coreml": "CoreMLExecutionProvider", "rocm": "ROCMExecutionProvider", "migraphx": "MIGraphXExecutionProvider"}


class Backend(Protocol):
    name: str          # e.g. "torch:cpu:fp32", "onnxruntime:cpu:fp32"
    device: torch.device  # where logits (and the sampler's generators) live
    vocab_size: int
    max_context: int   # positions the model was built for

    def empty_past(self, batch: int) -> list[Tensor]: ...

    def forward(self, ids_BS: Tensor, mask_BT: Tensor, pos_BS: Tensor,
                past: list[Tensor]) -> tuple[Tensor, list[Tensor]]: ...


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise KeelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}", field="dtype")
    return DTYPES[dtype]


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of an HF decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class KVModel(torch.nn.Module):
    """An HF causal LM as a pure function of flat tensors: the torch backend runs it and the ONNX
    exporter traces it, so both compute exactly the same graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers
        self.cache_kw = cache_kwarg(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_kw: cache})
        cache = out.cache if self.cache_kw == "cache" else out.past_key_values
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return out.logits, present


class TorchBackend:
    """Any HF causal LM on any torch device (cpu, cuda, npu, xpu, mps) in fp32, bf16 or fp16."""

    def __init__(self, model, device: torch.device, dtype: str = "fp32"):
        self.dtype = check_dtype(dtype)
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.kv = KVModel(self.model)
        self.layers, self.kv_heads, self.head_dim = kv_shape(model.config)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.name = f"torch:{self.device.type}:{dtype}"

    def empty_past(self, batch: int) -> list[Tensor]:
        return [torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=self.dtype, device=self.device)
                for _ in range(2 * self.layers)]

    @torch.no_grad()
    def forward(self, ids_BS, mask_BT, pos_BS, past):
        logits_BSV, present = self.kv(ids_BS.to(self.device), mask_BT.to(self.device), pos_BS.to(self.device), past)
        return logits_BSV.float(), present


class OrtBackend:
    """An ONNX graph written by `keel export` on any ONNX Runtime execution provider.

    Tensors cross into ONNX Runtime as numpy arrays on the host: simple and right everywhere; on
    an accelerator provider, I/O binding would keep the cache on the device (not done yet)."""

    def __init__(self, onnx_dir: str | Path, provider: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        meta_path = onnx_dir / ONNX_META
        if not meta_path.is_file() or not (onnx_dir / ONNX_FILE).is_file():
            raise KeelError(f"{onnx_dir} has no {ONNX_FILE} with {ONNX_META}: "
                            f"make one with `keel export --model MODEL --out {onnx_dir}`")
        self.meta = json.loads(meta_path.read_text())
        full = PROVIDERS.get(provider.lower(), provider)
        available = ort.get_available_providers()
        if full not in available:
            raise KeelError(f"ONNX Runtime provider {provider!r} is not available here (have: {', '.join(available)}); "
                            "install the onnxruntime build for your accelerator or set provider to cpu", field="provider")
        if self.meta["dtype"] == "bf16":
            raise KeelError("the onnxruntime backend feeds numpy arrays, which have no bf16: export with dtype fp16 or fp32",
                            field="dtype")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = [full] + (["CPUExecutionProvider"] if full != "CPUExecutionProvider" else [])
        self.session = ort.InferenceSession(str(onnx_dir / ONNX_FILE), sess_options=opts, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.layers, self.kv_heads, self.head_dim = self.meta["layers"], self.meta["kv_heads"], self.meta["head_dim"]
        self.vocab_size, self.max_context = self.meta["vocab_size"], self.meta["max_context"]
        self.np_dtype = {"fp32": "float32", "fp16": "float16"}[self.meta["dtype"]]
        self.device = torch.device("cpu")
        short = next((k for k, v in PROVIDERS.items() if v == full), full)
        self.name = f"onnxruntime:{short}:{self.meta['dtype']}"

    def empty_past(self, batch: int) -> list[Tensor]:
        dtype = DTYPES[self.meta["dtype"]]
        return [torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=dtype) for _ in range(2 * self.layers)]

    def forward(self, ids_BS, mask_BT, pos_BS, past):
        feeds = {"input_ids": ids_BS.cpu().numpy(), "attention_mask": mask_BT.cpu().numpy(),
                 "position_ids": pos_BS.cpu().numpy()}
        feeds.update({name: t.cpu().numpy() for name, t in zip(self.inputs[3:], past)})
        logits, *present = self.session.run(self.outputs, feeds)
        return torch.from_numpy(logits).float(), [torch.from_numpy(p) for p in present]


def parse_spec(spec: str) -> tuple[str, str, str]:
    """"torch:cpu:fp32" -> ("torch", "cpu", "fp32"). Missing parts default to cpu and fp32."""
    parts = spec.split(":")
    if not 1 <= len(parts) <= 3 or parts[0] not in ("torch", "onnxruntime"):
        raise KeelError(f"backend spec {spec!r} is not KIND[:DEVICE[:DTYPE]] with KIND torch or onnxruntime "
                        "(e.g. torch:cpu:fp32, onnxruntime:cpu:fp32, torch:npu:bf16)")
    kind, device, dtype = (parts + ["cpu", "fp32"][len(parts) - 1:])[:3]
    check_dtype(dtype)
    return kind, device, dtype


def load_torch_backend(model_dir: str | Path, device: str = "auto", dtype: str = "fp32"):
    """A TorchBackend over an HF model directory, and its tokenizer."""
    from keel.device import pick_device
    from keel.models import load_model

    check_dtype(dtype)
    dev = pick_device(device)
    model, tokenizer = load_model(model_dir, dev)
    return TorchBackend(model, dev, dtype), tokenizer


def load_ort_backend(onnx_dir: str | Path, provider: str = "cpu"):
    """An OrtBackend over a `keel export` directory, and the tokenizer saved beside the graph."""
    from transformers import AutoTokenizer

    backend = OrtBackend(onnx_dir, provider)
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return backend, tokenizer


def load_backend(model_dir: str | Path, backend: str = "torch", device: str = "auto", dtype: str = "fp32",
                 provider: str = "cpu"):
    """`backend` torch: `model_dir` is an HF directory; onnxruntime: a `keel export` directory."""
    if backend == "torch":
        return load_torch_backend(model_dir, device, dtype)
    if backend == "onnxruntime":
        return load_ort_backend(model_dir, provider)
    raise KeelError(f"unknown backend {backend!r}: use torch or onnxruntime")
