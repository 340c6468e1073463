"""keel.engine.quantize: the numpy re-quantization of the rollout sampler's weights equals what ONNX
Runtime's own tools make, bit for bit, ties and all-zero blocks included; by-hand values."""

import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from keel.engine.quantize import int4_blocks_KN, int8_per_channel_KN, round_half_away_f32


def tricky_weights_KN(K: int, N: int) -> np.ndarray:
    """Random weights with the cases that tell formulas apart: exact halves (round to even vs away),
    an all-zero column, a column whose largest magnitude is positive, one whose extremes are
    equal and opposite, tiny and large ranges."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (K, N)).astype(np.float32)
    w[:, 0] = 0.0
    w[:, 1] = np.resize(np.float32([127.0, -3.5, 2.5, 0.5, -0.5, 1.5]), K)    # int8 scale exactly 1: halves
    w[:, 2] = np.resize(np.float32([-8.0, 0.5, -1.5, 2.5, 3.5, -0.5]), K)     # int4 scale exactly 1: halves
    w[:, 3] = np.resize(np.float32([8.0, -0.5, 1.5, -2.5, 7.5, 0.25]), K)     # largest magnitude positive
    w[:, 4] = np.resize(np.float32([0.3, -0.3, 0.1]), K)                      # |max| == |min|
    w[:, 5] *= 1e-30
    w[:, 6] *= 1e4
    return w


def tool_output(w_KN: np.ndarray, dtype: str, tmp_path) -> dict[str, np.ndarray]:
    """The initializers ONNX Runtime's tool makes for Y = X @ W (W a constant [K, N])."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    K, N = w_KN.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])],
                              [numpy_helper.from_array(w_KN, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if dtype == "int8":
        onnx.save(model, tmp_path / "f.onnx")
        quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
        model = onnx.load(tmp_path / "q.onnx")
    else:
        tool = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
        tool.process()
        model = tool.model.model
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_round_half_away_is_c_roundf():
    x = np.float32([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4999998, -7.5, 3.0])
    assert round_half_away_f32(x).tolist() == [1, 2, 3, -1, -3, 0, 2, -8, 3]


def test_int8_by_hand():
    w_KN = np.float32([[127.0, 0.0], [-3.5, 0.0], [2.5, 0.0], [-0.5, 0.0]])
    q_KN, scale_N, zero_N = int8_per_channel_KN(w_KN)
    assert scale_N.tolist() == [1.0, 1.0]  # 2 * 127 / 254; an all-zero channel gets 1
    assert q_KN[:, 0].tolist() == [127, -4, 2, 0] and q_KN[:, 1].tolist() == [0, 0, 0, 0]  # halves to even
    assert zero_N.tolist() == [0, 0] and q_KN.dtype == np.int8


def test_int4_by_hand():
    w_KN = np.zeros((32, 2), np.float32)
    w_KN[:4, 0] = [-8.0, 0.5, -1.5, 7.0]  # largest magnitude -8: scale 1, codes w + 8, halves away from 0
    w_KN[:2, 1] = [8.0, -0.5]             # largest magnitude +8: scale -1, codes 8 - w
    packed_NBH, scale_NB = int4_blocks_KN(w_KN)
    assert scale_NB.tolist() == [[1.0], [-1.0]]
    codes = lambda n: [(b >> s) & 15 for b in packed_NBH[n, 0] for s in (0, 4)]  # noqa: E731
    assert codes(0)[:5] == [0, 9, 7, 15, 8] and codes(1)[:3] == [0, 9, 8]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_numpy_requantization_equals_the_tool_bit_for_bit(dtype, tmp_path):
    w_KN = tricky_weights_KN(96, 24)  # int4: three blocks of 32 along K
    made = tool_output(w_KN, dtype, tmp_path)
    if dtype == "int8":
        names, ours = ["W_quantized", "W_scale", "W_zero_point"], int8_per_channel_KN(w_KN)
    else:
        names, ours = ["W_Q4", "W_scales"], int4_blocks_KN(w_KN)
    for name, mine in zip(names, ours):
        theirs = made[name].reshape(mine.shape)
        assert mine.dtype == theirs.dtype and np.array_equal(mine.view(np.uint8), theirs.view(np.uint8)), name


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_weight_feeds_of_a_model_equal_what_the_tool_made_of_its_rollout_graph(dtype):
    """On a real rollout graph (a tied-embedding Qwen3): every MatMul weight was quantized by the tool,
    and feeding the same weights again through numpy gives the same inputs, bit for bit."""
    import torch

    from keel.engine.backends import fp32_state, rollout_graph
    from keel.engine.quantize import PARTS, weight_feeds
    from keel.models import init_model

    torch.manual_seed(0)
    model, _ = init_model("qwen3", layers=1, hidden=64, seed=0)
    _, proto, feeds, made = rollout_graph(model, dtype)
    matmuls = [n for n in proto.graph.node if n.op_type in ("MatMulInteger", "MatMulNBits")]
    assert len(matmuls) == 8  # q k v o gate up down, and the LM head (a quantized copy of the tied embedding)
    assert sum(part == 0 for _, part in feeds.values()) == 8 and len({p for _, p in feeds.values()}) == 1 + len(PARTS[dtype])
    again = weight_feeds(feeds, fp32_state(model.state_dict()), dtype)
    assert again.keys() == made.keys()
    for name in made:
        assert again[name].dtype == made[name].dtype and np.array_equal(again[name], made[name]), name


def test_the_quantizers_leave_the_processs_logging_alone():
    """ONNX Runtime's int4 quantizer calls logging.basicConfig(level=INFO) when imported and logs a
    line per graph node: in a fresh process (pytest's own log handlers would hide that), an int4
    graph prints nothing and leaves the root logger as it was."""
    code = """if True:
        import logging
        from keel.engine.backends import rollout_graph
        from keel.models import init_model
        rollout_graph(init_model("qwen3", layers=1, hidden=64, seed=0)[0], "int4")
        root = logging.getLogger()
        print(root.level, len(root.handlers))
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(logging.WARNING), "0"] and "[INFO]" not in proc.stderr, proc.stderr[-2000:]
