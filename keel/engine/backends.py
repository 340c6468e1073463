"""Inference backends behind one small interface: a forward step over a flat KV cache.

A backend is anything with `forward(ids_BS, mask_BT, pos_BS, past) -> (logits_BSV, present)`:

- `ids_BS`   the new tokens (S = prompt length at prefill, 1 at decode), int64;
- `mask_BT`  1/0 over the T = past + S columns (left padding is 0), int64;
- `pos_BS`   each new token's position, counted from its row's first real token, int64;
- `past`     the KV cache (`empty_past(B)` at prefill); `present` holds S more columns;
- `logits_to_keep`  0: logits of every new token; n: of the last n only (a backend may give more).

Logits come back as fp32 torch tensors on the backend's device, whatever the backend computes in.
The cache is the backend's own: the batching engine changes its rows only through `join` (add the
rows of a prefill's cache, the narrower side padded on the left) and `keep` (drop rows, trim
columns on the left). `TorchBackend` writes it in place in preallocated buffers
(keel.engine.kvcache); `OrtBackend` passes lists of tensors through its graph (`ListCache`).

Two backends: `TorchBackend` (any HF causal LM on any torch device, npu included, in fp32, bf16 or
fp16) and `OrtBackend` (an exported ONNX graph on any ONNX Runtime execution provider). The sampler
and the stop rules are not here: they are the rollout engine's, applied by `keel.engine.batching`.

Both can follow a model that is training (RL rollouts on another backend): `TorchBackend` holds its
own copy, and `OrtBackend.from_model` exports the model once (fp32, fp16, or int8 / int4 weights
quantized by ONNX Runtime's tools: keel.engine.quantize); `load_weights(state)` then puts the
model's current weights (its full state dict) in, without re-exporting or re-quantizing the graph
with the tools.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from keel.errors import KeelError
from keel.engine import kvcache
from keel.engine.kvcache import cache_kwarg
from keel.engine.quantize import QUANTIZED, quantize_graph, weight_feeds
from keel.models import eager_if_soft_capped

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# An ONNX graph's dtype -> the dtype its activations and KV cache have: int8 and int4 graphs
# quantize only the matmul weights (keel.engine.quantize).
ORT_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "fp32", "int4": "fp32"}
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

    def empty_past(self, batch: int): ...

    def forward(self, ids_BS: Tensor, mask_BT: Tensor, pos_BS: Tensor, past,
                logits_to_keep: int = 0) -> tuple[Tensor, object]: ...

    def join(self, past, new, rows: list[int], capacity: int): ...

    def keep(self, past, rows: list[int], first: int): ...


class ListCache:
    """The cache calls of a backend whose cache is a flat list [k0, v0, k1, v1, ...] of [B, H, T, D]
    tensors and whose `forward` returns a new list (OrtBackend): each call builds new tensors."""

    def join(self, past: list[Tensor] | None, new: list[Tensor], rows: list[int], capacity: int) -> list[Tensor]:
        """`past`'s rows (None: no rows yet) then rows `rows` of `new` (a prefill's cache), aligned on
        their last column: the narrower side is padded on the left with zeros. `capacity` (the widest
        the batch can grow to) does not matter to lists."""
        idx = torch.tensor(rows, dtype=torch.long)
        new = [t.index_select(0, idx.to(t.device)) for t in new]
        if past is None:
            return new
        W = max(past[0].shape[2], new[0].shape[2])
        return [torch.cat([pad_left(a, W - a.shape[2]), pad_left(b, W - b.shape[2])], 0) for a, b in zip(past, new)]

    def keep(self, past: list[Tensor], rows: list[int], first: int) -> list[Tensor]:
        """`past` with only rows `rows` and its first `first` columns dropped."""
        idx = torch.tensor(rows, dtype=torch.long)
        return [t.index_select(0, idx.to(t.device))[:, :, first:] for t in past]


def pad_left(t: Tensor, n: int) -> Tensor:
    """Zero columns in front of dim 2 (time) of a [B, H, T, D] cache tensor."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[2] = n
    return torch.cat([t.new_zeros(shape), t], 2)


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise KeelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}", field="dtype")
    return DTYPES[dtype]


# Attention layers that a cache keeping every column serves exactly. The attention mask applies a
# sliding window, counting cache columns back from the query's column; a row's tokens fill
# contiguous columns (padding only on the left), so its last `window` columns are its last
# `window` tokens. Chunked attention is not here: its chunks start at absolute columns, which the
# engine's left padding shifts.
FULL_CACHE_LAYERS = frozenset({"full_attention", "sliding_attention"})


def attention_layer_types(config) -> list[str]:
    """The cache layer type of each decoder layer ("full_attention", "sliding_attention", ...), as
    transformers' own `DynamicCache(config=...)` reads them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0]


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of an HF decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def engine_ready(model) -> None:
    """Refuse a model whose attention layers a cache of every column would serve wrongly, and run
    soft-capped attention eagerly (`eager_if_soft_capped`: `model` is switched in place). The torch
    backend and the ONNX trace (`KVModel`) both call it, so they refuse and run the same models."""
    types = set(attention_layer_types(model.config))
    if not types or not types <= FULL_CACHE_LAYERS:
        other = sorted(types - FULL_CACHE_LAYERS)
        raise KeelError(f"{type(model).__name__} has {', '.join(other) or 'no attention'} layers: the keel engine's "
                        f"KV cache serves only {' and '.join(sorted(FULL_CACHE_LAYERS))} layers", field="model")
    eager_if_soft_capped(model)


class KVModel(torch.nn.Module):
    """An HF causal LM as a pure function of flat tensors, which the ONNX exporter traces."""

    def __init__(self, model):
        super().__init__()
        engine_ready(model)
        self.model = model
        self.layers = model.config.num_hidden_layers
        self.cache_kw = cache_kwarg(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]):
        from transformers import DynamicCache

        # No config: every layer keeps all its columns, sliding-window layers too (the attention
        # mask applies the window), so that every layer's cache has the T columns the engine pads,
        # joins and trims; a config would trim sliding layers to their window.
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_kw: cache})
        cache = out.cache if self.cache_kw == "cache" else out.past_key_values
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return out.logits, present


class TorchBackend:
    """Any HF causal LM on any torch device (cpu, cuda, npu, xpu, mps) in fp32, bf16 or fp16.
    It moves and casts `model` in place: pass a copy to keep the original; `TorchBackend.of(model)`
    samples from a model where it is, as it is. Its KV cache lives in preallocated buffers written
    in place (keel.engine.kvcache): a decode step copies nothing but its own column."""

    def __init__(self, model, device: torch.device, dtype: str = "fp32"):
        self._wrap(model.to(device=torch.device(device), dtype=check_dtype(dtype)), dtype)

    @classmethod
    def of(cls, model, compile: bool = False) -> "TorchBackend":
        """`model` itself, on its device and in its dtype: nothing is moved, cast or copied (a cast
        would also round its fp32 buffers). It is put in eval mode: the caller restores its mode.
        `compile`: decode steps run through torch.compile (opt-in: the first call per model class
        compiles, tens of seconds on a CPU; forward hooks do not see compiled steps); if compiling
        fails, that step runs eagerly, with a warning, and the class stays eager."""
        dtype = {v: k for k, v in DTYPES.items()}.get(next(model.parameters()).dtype)
        if dtype is None:
            raise KeelError(f"the torch engine runs {', '.join(DTYPES)} models, not {next(model.parameters()).dtype}",
                            field="dtype")
        backend = cls.__new__(cls)
        backend._wrap(model, dtype, compile)
        return backend

    def _wrap(self, model, dtype: str, compile: bool = False) -> None:
        self.compile = compile
        engine_ready(model)
        self.model, self.dtype = model.eval(), DTYPES[dtype]
        self.device = next(model.parameters()).device
        self.cache_kw = cache_kwarg(model)
        self.keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.max_context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.name = f"torch:{self.device.type}:{dtype}"

    def empty_past(self, batch: int) -> kvcache.Cache:
        return kvcache.buffer_cache(self.layers)

    @torch.no_grad()
    def forward(self, ids_BS, mask_BT, pos_BS, past, logits_to_keep: int = 0):
        """Logits, and `past` itself with the new columns written into its buffers."""
        kwargs = dict(input_ids=ids_BS.to(self.device), attention_mask=mask_BT.to(self.device),
                      position_ids=pos_BS.to(self.device), use_cache=True, **{self.cache_kw: past})
        if self.keep_kw:
            kwargs["logits_to_keep"] = logits_to_keep
        compiled = compiled_forward(self.model) if self.compile and ids_BS.shape[1] == 1 else None
        if compiled is not None:
            ends = [layer.end for layer in past.layers]
            try:
                return compiled(**kwargs).logits.float(), past
            except Exception as e:  # no C++ compiler, an op inductor cannot lower, ...
                for layer, end in zip(past.layers, ends):  # the failed step may have written its column
                    layer.rewind(end)
                _COMPILED[type(self.model)] = None
                reason = (str(e).strip().splitlines() or [""])[0]
                warnings.warn(f"torch.compile failed for {type(self.model).__name__} ({type(e).__name__}: "
                              f"{reason}); decoding eagerly", stacklevel=2)
        return self.model(**kwargs).logits.float(), past

    def join(self, past: kvcache.Cache | None, new: kvcache.Cache, rows: list[int], capacity: int) -> kvcache.Cache:
        return kvcache.join(past, new, rows, capacity)

    def keep(self, past: kvcache.Cache, rows: list[int], first: int) -> kvcache.Cache:
        return kvcache.keep(past, rows, first)

    @torch.no_grad()
    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Copy `state` (a model's full weights by this model's `state_dict()` names, on any device
        and in any dtype) into this backend's own, cast to its dtype; with equal devices and dtypes,
        bit for bit."""
        for name, tensor in self.model.state_dict().items():
            tensor.copy_(state[name])


# One compiled forward per model class (None: compiling failed). The function is compiled unbound
# so the cache holds no model alive; dynamic=True gives one graph for all batch sizes and lengths.
_COMPILED: dict[type, object] = {}


def compiled_forward(model):
    cls = type(model)
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(cls.forward, dynamic=True)
    fn = _COMPILED[cls]
    return None if fn is None else functools.partial(fn, model)


class OrtBackend(ListCache):
    """An ONNX graph written by `keel export` on any ONNX Runtime execution provider.

    Tensors cross into ONNX Runtime as numpy arrays on the host: simple and right everywhere; on
    an accelerator provider, I/O binding would keep the cache on the device (not done yet)."""

    def __init__(self, onnx_dir: str | Path, provider: str = "cpu", threads: int = 0):
        onnx_dir = Path(onnx_dir)
        meta_path = onnx_dir / ONNX_META
        if not meta_path.is_file() or not (onnx_dir / ONNX_FILE).is_file():
            raise KeelError(f"{onnx_dir} has no {ONNX_FILE} with {ONNX_META}: "
                            f"make one with `keel export --model MODEL --out {onnx_dir}`")
        self.meta = json.loads(meta_path.read_text())
        full = check_provider(provider)
        if self.meta["dtype"] not in ORT_DTYPES:
            raise KeelError(f"the onnxruntime backend runs {', '.join(ORT_DTYPES)} graphs, not {self.meta['dtype']} "
                            "(numpy has no bf16): export with one of those dtypes", field="dtype")
        self.feeds: dict[str, tuple] = {}  # weight name -> (state key, quantized part); none: nothing to load
        self._open(str(onnx_dir / ONNX_FILE), full, threads)

    def _open(self, graph, provider: str, threads: int) -> None:
        """Start the session over `graph` (a path or serialized bytes) described by `self.meta`."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        try:
            self.session = ort.InferenceSession(graph, sess_options=opts, providers=providers)
        except Exception as e:  # e.g. a kernel this provider lacks for the graph's dtype
            raise KeelError(f"ONNX Runtime cannot run the {self.meta['dtype']} graph on {provider}: {root_cause(e)}",
                            field="dtype") from e
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past.")]
        self.layers, self.kv_heads, self.head_dim = self.meta["layers"], self.meta["kv_heads"], self.meta["head_dim"]
        self.vocab_size, self.max_context = self.meta["vocab_size"], self.meta["max_context"]
        self.cache_dtype = DTYPES[ORT_DTYPES[self.meta["dtype"]]]
        self.device = torch.device("cpu")
        short = next((k for k, v in PROVIDERS.items() if v == provider), provider)
        self.name = f"onnxruntime:{short}:{self.meta['dtype']}"

    @classmethod
    def from_model(cls, model, provider: str = "cpu", threads: int = 0, dtype: str = "fp32") -> "OrtBackend":
        """A graph of `model`, exported once in memory, that `load_weights` can then follow while
        `model` trains: fp32, fp16 (traced in fp16), or int8 / int4 (fp32 activations, matmul
        weights quantized by ONNX Runtime's tools once, then by the same maths in numpy at every
        `load_weights`: keel.engine.quantize). The exporter's optimiser is off: it folds and merges
        weights (a transposed copy, one tensor for equal norms), which would cut the link between a
        graph weight and a parameter. Graphs over 2 GB do not fit in memory this way.

        New weights are written into the graph's initializers and a new session is opened over it,
        rather than fed as graph inputs at every run: ONNX Runtime then folds the weights'
        transposes and prepacks them once per sync, not once per decode step (on the 27M model:
        int4 decoding 3.2x faster, int8 1.1x: README, "Low-precision ONNX Runtime samplers").
        Not SessionOptions.add_initializer: ONNX Runtime folds constants from the graph's own
        initializers before those replace them, so folded transposes kept the old weights."""
        backend = cls.__new__(cls)
        backend.meta, backend.proto, backend.feeds, weights = rollout_graph(model, dtype)
        embed_weights(backend.proto, weights)
        backend.provider, backend.threads = check_provider(provider), threads
        backend.weight_tensors = {i.name: i for i in backend.proto.graph.initializer if i.name in backend.feeds}
        backend._open(backend.proto.SerializeToString(), backend.provider, threads)
        return backend

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Write `state` (the model's full weights by its `state_dict()` names; only those the graph
        reads are used), quantized as the graph's were, into the graph's initializers and open a new
        session over it (a backend from `from_model`)."""
        assert self.feeds, "load_weights needs an OrtBackend made by OrtBackend.from_model"
        dtype = self.meta["dtype"]
        weights = fp32_state(state, {key for key, _ in self.feeds.values()})
        for name, w in cast_fp16(weight_feeds(self.feeds, weights, dtype), dtype).items():
            self.weight_tensors[name].raw_data = w.tobytes()  # same name, dtype and shape: only the bytes change
        self._open(self.proto.SerializeToString(), self.provider, self.threads)

    def empty_past(self, batch: int) -> list[Tensor]:
        return [torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=self.cache_dtype)
                for _ in range(2 * self.layers)]

    def forward(self, ids_BS, mask_BT, pos_BS, past, logits_to_keep: int = 0):
        feeds = {"input_ids": ids_BS.cpu().numpy(), "attention_mask": mask_BT.cpu().numpy(),
                 "position_ids": pos_BS.cpu().numpy()}
        feeds.update({name: t.cpu().numpy() for name, t in zip(self.past_names, past)})
        logits, *present = self.session.run(self.outputs, feeds)
        return torch.from_numpy(logits).float(), [torch.from_numpy(p) for p in present]


def check_provider(provider: str) -> str:
    """The full name of ONNX Runtime execution provider `provider` ("cpu", or a full name), if this
    onnxruntime build has it; a KeelError naming the ones it has otherwise."""
    import onnxruntime as ort

    full = PROVIDERS.get(provider.lower(), provider)
    available = ort.get_available_providers()
    if full not in available:
        raise KeelError(f"ONNX Runtime provider {provider!r} is not available here (have: {', '.join(available)}); "
                        "install the onnxruntime build for your accelerator or set provider to cpu", field="provider")
    return full


OPSET = 18


def io_names(layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names for a model of `layers` decoder layers."""
    kv = [f"{i}.{part}" for i in range(layers) for part in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"] + [f"past.{n}" for n in kv],
            ["logits"] + [f"present.{n}" for n in kv])


def graph_meta(model, dtype: str) -> dict:
    """keel_onnx.json's description of the graph of `model` in `dtype`."""
    layers, kv_heads, head_dim = kv_shape(model.config)
    names_in, names_out = io_names(layers)
    return {"format": "onnx", "opset": OPSET, "dtype": dtype, "layers": layers, "kv_heads": kv_heads,
            "head_dim": head_dim, "vocab_size": model.get_input_embeddings().num_embeddings,
            "max_context": getattr(model.config, "max_position_embeddings", None) or 2048,
            "inputs": names_in, "outputs": names_out}


def root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost exception `e` was raised from: exporters wrap the real
    cause (e.g. an op with no ONNX function) in errors that only say which step failed."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def trace_onnx(model, what: str, field: str, optimize: bool = True):
    """`model` (in its own dtype, on the CPU) traced through `KVModel` into an ONNX program with
    dynamic batch and lengths: the one export path of `keel export` and the rollout sampler. The
    exporter's own chatter stays off the terminal; a failure is a KeelError naming its root cause."""
    layers, kv_heads, head_dim = kv_shape(model.config)
    names_in, names_out = io_names(layers)
    batch, seq, total, past_len = (torch.export.Dim(n) for n in ("batch", "seq", "total", "past"))
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               [{0: batch, 2: past_len} for _ in range(2 * layers)])
    # Sizes above 1 everywhere: torch.export specialises dims of size 0 and 1.
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    example = (torch.randint(0, 8, (2, 3), generator=g), torch.ones(2, 7, dtype=torch.long),
               torch.arange(4, 7).repeat(2, 1),
               [torch.randn(2, kv_heads, 4, head_dim, generator=g).to(dtype) for _ in range(2 * layers)])
    log, onnx_logger = io.StringIO(), logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            return torch.onnx.export(KVModel(model), example, input_names=names_in, output_names=names_out,
                                     dynamic_shapes=dynamic, dynamo=True, opset_version=OPSET, verbose=False,
                                     optimize=optimize)
    except Exception as e:
        raise KeelError(f"ONNX export of {what} failed: {root_cause(e)}", field=field) from e
    finally:
        onnx_logger.setLevel(level)


def export_with_weight_inputs(model, dtype: str = "fp32") -> tuple[dict, object, dict[str, str]]:
    """(keel_onnx.json-style meta, onnx ModelProto, graph input name -> `model.state_dict()` key):
    `model` traced through `KVModel` in `dtype` (fp32 or fp16) on the CPU (a copy; `model` is not
    touched), with every parameter moved from the graph's initializers to its inputs. Buffers
    (e.g. RoPE frequencies) stay constants."""
    import onnx

    traced = copy.deepcopy(model).to("cpu", DTYPES[dtype]).eval()
    program = trace_onnx(traced, "the model for the rollout sampler", "rollout.backend", optimize=False)
    proto = program.model_proto
    names_of = {}  # one entry per parameter tensor: all its names (tied embeddings have two)
    for name, p in traced.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(f"model.{name}")  # KVModel holds the HF model as `model`
    params = {name for names in names_of.values() for name in names}
    weight_names = {}
    for init in list(proto.graph.initializer):
        if init.name in params:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
            proto.graph.initializer.remove(init)
            weight_names[init.name] = init.name.removeprefix("model.")
    missing = [names[0] for names in names_of.values() if not any(n in weight_names for n in names)]
    if missing:
        raise KeelError(f"the exported graph has no input for parameters {missing[:3]}: this architecture's "
                        "weights cannot follow training yet", field="rollout.backend")
    return graph_meta(traced, dtype), proto, weight_names


def fp32_state(state: dict[str, Tensor], keys=None) -> dict:
    """The tensors of `state` (those named in `keys`, default all) as fp32 numpy copies on the host."""
    return {key: state[key].detach().to("cpu", torch.float32, copy=True).numpy() for key in keys or state}


def rollout_graph(model, dtype: str = "fp32"):
    """(meta, onnx ModelProto, feeds, weights): the graph `OrtBackend.from_model` runs and `keel
    export` writes for `dtype` fp32, fp16, int8 or int4, with its weights as graph inputs; `feeds`
    maps each to (its `model.state_dict()` key, its part of a quantized weight or None), and
    `weights` holds `model`'s values for them. int8 and int4 quantize the matmul weights with ONNX
    Runtime's tools, here, once (those `weights` are the tools' own output); later weights go
    through `quantize.weight_feeds`."""
    if dtype not in ORT_DTYPES:
        raise KeelError(f"the onnxruntime backend runs {', '.join(ORT_DTYPES)} graphs, not {dtype!r}", field="dtype")
    meta, proto, weight_names = export_with_weight_inputs(model, ORT_DTYPES[dtype])
    state = fp32_state(model.state_dict(), set(weight_names.values()))
    made_by_tool = {}
    if dtype in QUANTIZED:
        proto, feeds, made_by_tool = quantize_graph(proto, weight_names, state, dtype)
    else:
        feeds = {name: (key, None) for name, key in weight_names.items()}
    weights = {name: state[key] for name, (key, part) in feeds.items() if part is None}
    return {**meta, "dtype": dtype}, proto, feeds, cast_fp16({**weights, **made_by_tool}, dtype)


def cast_fp16(weights: dict, dtype: str) -> dict:
    """An fp16 graph's weight inputs are fp16; any other graph's stay as they are."""
    return {name: w.astype("float16") for name, w in weights.items()} if dtype == "fp16" else weights


def embed_weights(proto, weights: dict) -> None:
    """Turn the graph inputs named in `weights` (name -> numpy array) into initializers holding them."""
    from onnx import numpy_helper

    for inp in [i for i in proto.graph.input if i.name in weights]:
        proto.graph.input.remove(inp)
        proto.graph.initializer.append(numpy_helper.from_array(weights[inp.name], inp.name))


@dataclass(frozen=True)
class BackendKind:
    """What the parts of a backend spec KIND:WHERE:DTYPE mean for one KIND."""
    where: str                 # the config field WHERE sets (RolloutConfig, ServeConfig): device | provider
    dtypes: tuple[str, ...]    # the DTYPEs it runs; the first is the default


# The one table of backend kinds that `keel parity`, `keel serve`, `keel rl --rollout` and recipes'
# `rollout:` sections accept. A new kind adds a row here and a branch in `open_backend`.
BACKEND_KINDS = {
    "torch": BackendKind("device", tuple(DTYPES)),
    "onnxruntime": BackendKind("provider", tuple(ORT_DTYPES)),
    "vllm": BackendKind("device", tuple(DTYPES)),  # keel.engine.vllm_backend, where vLLM is installed
}


def parse_spec(spec: str) -> tuple[str, str, str]:
    """"torch:cpu:fp32" -> ("torch", "cpu", "fp32"); "onnxruntime:cpu:int8" -> ("onnxruntime", "cpu",
    "int8"). WHERE defaults to cpu, DTYPE to the kind's first (fp32)."""
    parts = spec.split(":")
    kinds = ", ".join(BACKEND_KINDS)
    if not 1 <= len(parts) <= 3 or parts[0] not in BACKEND_KINDS:
        raise KeelError(f"backend spec {spec!r} is not KIND[:WHERE[:DTYPE]] with KIND one of {kinds} "
                        "(e.g. torch:cpu:fp32, torch:npu:bf16, onnxruntime:cpu:int8, vllm:cpu)")
    kind = BACKEND_KINDS[parts[0]]
    _, where, dtype = (parts + ["cpu", kind.dtypes[0]][len(parts) - 1:])[:3]
    if dtype not in kind.dtypes:
        raise KeelError(f"backend spec {spec!r}: {parts[0]} runs dtype {' | '.join(kind.dtypes)}, not {dtype!r}",
                        field="dtype")
    return parts[0], where, dtype


def rollout_section(spec: str) -> dict:
    """A backend spec as RLConfig's `rollout` section: "onnxruntime:cpu:int8" -> {"backend":
    "onnxruntime", "provider": "cpu", "dtype": "int8"}; "torch:cuda:bf16" -> {"backend": "torch",
    "device": "cuda", "dtype": "bf16"}."""
    kind, where, dtype = parse_spec(spec)
    return {"backend": kind, BACKEND_KINDS[kind].where: where, "dtype": dtype}


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


def open_backend(spec: str, model_dir: str | Path):
    """The backend `spec` names (`parse_spec`) over `model_dir`, and its tokenizer. onnxruntime runs
    a `keel export` directory of the spec's dtype, or exports an HF directory in memory into the
    very graph the rollout sampler runs (`OrtBackend.from_model`); the others load an HF directory."""
    kind, where, dtype = parse_spec(spec)
    if kind != "onnxruntime":
        return load_backend(model_dir, kind, where, dtype)
    if (Path(model_dir) / ONNX_FILE).is_file():
        backend, tokenizer = load_ort_backend(model_dir, where)
        if backend.meta["dtype"] != dtype:
            raise KeelError(f"{model_dir} holds a {backend.meta['dtype']} ONNX graph, not {dtype}: pass the HF model "
                            "directory, or export that dtype (`keel export --dtype`)", field="dtype")
        return backend, tokenizer
    from keel.models import load_model

    model, tokenizer = load_model(model_dir)
    return OrtBackend.from_model(model, where, dtype=dtype), tokenizer


def load_backend(model_dir: str | Path, backend: str = "torch", device: str = "auto", dtype: str = "fp32",
                 provider: str = "cpu"):
    """`backend` torch: `model_dir` is an HF directory; onnxruntime: a `keel export` directory; vllm:
    an HF directory, opened as a `VllmSampler`, which generates itself (no `Backend`: keel's engine
    cannot step it; `keel parity` compares it through its `generate_with_top_k`); a spec such as
    onnxruntime:cpu:int8 (with a colon): `open_backend`, which ignores the other arguments."""
    if ":" in backend:
        return open_backend(backend, model_dir)
    if backend == "torch":
        return load_torch_backend(model_dir, device, dtype)
    if backend == "onnxruntime":
        return load_ort_backend(model_dir, provider)
    if backend == "vllm":  # a sampler with its own engine (keel.engine.vllm_backend), where vLLM is installed
        from keel.engine.vllm_backend import load_vllm_sampler

        return load_vllm_sampler(model_dir, device, dtype)
    raise KeelError(f"unknown backend {backend!r}: use torch, onnxruntime or vllm")
