"""Weight-only quantized ONNX graphs for the rollout sampler, made once by ONNX Runtime's own tools
and fed new weights every step by the same maths in numpy.

Once: `quantize_graph` takes the rollout graph (parameters as graph inputs, see
`backends.export_with_weight_inputs`), gives every matmul weight to its MatMul as a constant
initializer (W^T, [in K, out N]), and runs ONNX Runtime's quantizer over it:

- int8: `quantize_dynamic` (per output channel, symmetric QInt8 weights, MatMul only): a weight
  becomes `{name}_quantized` int8 [K, N], `{name}_scale` fp32 [N] and `{name}_zero_point` int8 [N]
  (zeros); activations are quantized on the fly by the graph (DynamicQuantizeLinear).
- int4: `MatMulNBitsQuantizer` (symmetric, blocks of BLOCK along K): a weight becomes `{name}_Q4`
  uint8 [N, K / BLOCK, BLOCK / 2] (two 4-bit codes a byte, low nibble first) and `{name}_scales`
  fp32 [N, K / BLOCK], run by the MatMulNBits kernel.

Every step: `int8_per_channel_KN` and `int4_blocks_KN` quantize the trainer's new weights with
exactly the tools' formulas (bit for bit: tests/unit/test_quantize.py), so the graph never goes
through the tool again. Everything that is not a MatMul weight (norms, the embedding's gather)
stays fp32.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from keel.errors import KeelError

QUANTIZED = ("int8", "int4")
BLOCK = 32  # int4: weights per scale, along the input dimension
FP32_TINY = np.finfo(np.float32).tiny


def int8_per_channel_KN(w_KN: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q_KN int8, scale_N fp32, zero_point_N int8) of a MatMul weight [K, N] as ONNX Runtime's
    `quantize_dynamic(per_channel=True, weight_type=QInt8)` makes them (quant_utils.compute_scale_zp
    and quantize_nparray, one output channel N at a time): symmetric range [-absmax, absmax] with
    0 inside, scale = 2 absmax / 254 in fp64 stored as fp32 (1 for an all-zero channel), q =
    round-half-even(w / scale) in fp32, clipped to [-127, 127]."""
    w_KN = np.asarray(w_KN, dtype=np.float32)
    absmax_N = np.abs(w_KN).max(axis=0)
    scale64_N = (2.0 * absmax_N.astype(np.float64)) / 254.0
    scale_N = np.where(scale64_N < FP32_TINY, 1.0, scale64_N).astype(np.float32)
    q_KN = np.clip(np.round(w_KN / scale_N), -127, 127).astype(np.int8)
    return q_KN, scale_N, np.zeros_like(scale_N, dtype=np.int8)


def round_half_away_f32(x: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero) on fp32, exactly: numpy's round goes to even."""
    whole = np.trunc(x)
    return whole + np.where(np.abs(x - whole) >= 0.5, np.sign(x), 0).astype(x.dtype)


def int4_blocks_KN(w_KN: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(packed_NBH uint8 [N, K / block, block / 2], scale_NB fp32 [N, K / block]) of a MatMul
    weight [K, N] as ONNX Runtime's MatMulNBitsQuantizer makes them (symmetric, MLAS
    BlockwiseQuantizer): per block the value of largest magnitude m (the minimum on a tie) gives
    scale = -m / 8, so m maps to code 0; code = clamp(roundf(w * fp32(1 / scale) + 8), 0, 15)
    (0 codes where the scale is 0), stored two a byte, the even k in the low nibble. K must be a
    multiple of `block` (ONNX Runtime would pad the last block; keel's models do not need it)."""
    w_KN = np.asarray(w_KN, dtype=np.float32)
    K, N = w_KN.shape
    if K % block:
        raise KeelError(f"int4: a weight's input dimension {K} is not a multiple of the block size {block}",
                        field="rollout.dtype")
    w_NBL = np.ascontiguousarray(w_KN.T).reshape(N, K // block, block)
    lo_NB, hi_NB = w_NBL.min(axis=2), w_NBL.max(axis=2)
    m_NB = np.where(np.abs(hi_NB) > np.abs(lo_NB), hi_NB, lo_NB)
    scale_NB = (-m_NB / np.float32(8.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        recip_NB = np.where(scale_NB != 0, np.float32(1.0) / scale_NB, np.float32(0.0)).astype(np.float32)
    code_NBL = np.clip(round_half_away_f32(w_NBL * recip_NB[:, :, None] + np.float32(8.0)), 0, 15).astype(np.uint8)
    packed_NBH = code_NBL[:, :, 0::2] | (code_NBL[:, :, 1::2] << 4)
    return packed_NBH, scale_NB


# The graph inputs a quantized weight becomes: suffix -> which array of the quantization it takes.
PARTS = {"int8": {"_quantized": 0, "_scale": 1, "_zero_point": 2}, "int4": {"_Q4": 0, "_scales": 1}}


def quantize_weights(w_KN: np.ndarray, dtype: str) -> tuple[np.ndarray, ...]:
    """The arrays of `PARTS[dtype]`, in its order, for one weight [K, N]."""
    return int8_per_channel_KN(w_KN) if dtype == "int8" else int4_blocks_KN(w_KN)


def quantize_graph(proto, weight_names: dict[str, str], state: dict[str, np.ndarray], dtype: str):
    """(quantized proto, graph input -> (state key, part of `PARTS[dtype]` or None for the fp32
    value), the tool's quantized arrays by graph input).

    `proto` is a graph whose inputs `weight_names` (graph input -> state key) carry the model's
    parameters and `state` their current fp32 values (numpy); it is changed in place. Every
    weight read only through Transpose -> MatMul becomes a constant W^T on those MatMuls, ONNX
    Runtime's tool quantizes them, and the quantized initializers go back to being graph inputs,
    whose values every sync computes (`weight_feeds`). A weight with other readers too (a tied
    embedding's gather) stays an fp32 input for those; the MatMul gets its own quantized copy."""
    import onnx
    from onnx import numpy_helper

    feeds: dict[str, tuple[str, int | None]] = {name: (key, None) for name, key in weight_names.items()}
    readers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    inputs = {i.name: i for i in proto.graph.input}
    constants: set[str] = set()  # the W^T initializers handed to the tool
    for name, key in weight_names.items():
        for t in [n for n in readers.get(name, []) if n.op_type == "Transpose"]:
            matmuls = readers.get(t.output[0], [])
            if (f"{name}.T" in constants or not matmuls
                    or any(m.op_type != "MatMul" or m.input[1] != t.output[0] for m in matmuls)):
                continue
            w_KN = np.ascontiguousarray(state[key].T)
            proto.graph.initializer.append(numpy_helper.from_array(w_KN, f"{name}.T"))
            for m in matmuls:
                m.input[1] = f"{name}.T"
            proto.graph.node.remove(t)
            constants.add(f"{name}.T")
            for suffix, part in PARTS[dtype].items():
                feeds[f"{name}.T{suffix}"] = (key, part)
        if not any(name in n.input for n in proto.graph.node):  # every reader was a quantized MatMul
            proto.graph.input.remove(inputs[name])
            del feeds[name]
    with quiet_root_logger():
        if dtype == "int8":
            quantized = _quantize_int8(proto)
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            tool = MatMulNBitsQuantizer(proto, block_size=BLOCK, is_symmetric=True)
            tool.process()
            quantized = tool.model.model
    made = {i.name for i in quantized.graph.initializer}
    lost = sorted(n for n in constants if n in made)
    if lost:
        raise KeelError(f"ONNX Runtime's {dtype} quantizer left {lost[0]} unquantized: this architecture's "
                        f"matmuls cannot be quantized for the rollout sampler yet", field="rollout.dtype")
    made_by_tool = {}
    for init in [i for i in quantized.graph.initializer if i.name in feeds]:
        quantized.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        quantized.graph.initializer.remove(init)
        made_by_tool[init.name] = numpy_helper.to_array(init)
    return quantized, feeds, made_by_tool


def _quantize_int8(proto):
    """`quantize_dynamic` needs files: the graph goes through a temporary folder."""
    import tempfile
    from pathlib import Path

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="keel-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(dst)


@contextlib.contextmanager
def quiet_root_logger():
    """ONNX Runtime's quantizers log at INFO (a line per graph node; advice to pre-process, meant
    for calibrated static quantization), and matmul_nbits_quantizer even calls
    logging.basicConfig(level=INFO) when first imported, which would print every library's INFO
    lines for the rest of the process. Inside: logging off up to WARNING; after: the root logger's
    level and handlers as they were."""
    root = logging.getLogger()
    level, handlers, disabled = root.level, list(root.handlers), logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(disabled)
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


def weight_feeds(feeds: dict[str, tuple[str, int | None]], state: dict[str, np.ndarray],
                 dtype: str) -> dict[str, np.ndarray]:
    """The graph inputs of `feeds` (from `quantize_graph`) for the weights `state` (fp32 numpy)."""
    out, done = {}, {}
    for name, (key, part) in feeds.items():
        if part is None:
            out[name] = state[key]
            continue
        if key not in done:
            done[key] = quantize_weights(np.ascontiguousarray(state[key].T), dtype)
        out[name] = done[key][part]
    return out
