"""hidden_logprobs (chunked LM head + log-softmax, its own backward) against the plain path:
`token_logprobs`/`entropy_BT` on the materialised logits, with autograd through them."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from keel.errors import KeelError
from keel.logprobs import entropy_BT, hidden_logprobs, token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def make(N, H, V, *, bias, dtype=torch.float32, seed=0):
    """Random leaves that need grad, token ids, and loss coefficients for logp and entropy."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).requires_grad_()
    bias_V = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    tokens = torch.randint(V, (N,), generator=g)
    c_logp, c_ent = torch.randn(2, N, generator=g, dtype=torch.float64).to(dtype)
    return hidden, weight, bias_V, tokens, c_logp, c_ent


def plain(hidden, weight, bias_V, tokens, temperature, chunk=None):
    """The reference: [1, N, V] logits, then the existing functions. With `chunk`, the logits are
    made by the same per-chunk matmuls as hidden_logprobs's (a bf16 matmul on the CPU rounds
    differently for different row counts, by up to a bf16 ulp)."""
    rows = [hidden] if chunk is None else hidden.split(chunk)
    logits_BTV = torch.cat([torch.nn.functional.linear(h, weight, bias_V) for h in rows]).unsqueeze(0)
    logp = token_logprobs(logits_BTV, tokens.unsqueeze(0), temperature)[0]
    # .float() first, as token_logprobs does: dividing bf16 logits by the temperature in bf16 (as
    # engine/sampler.py does before entropy_BT) adds a bf16 rounding of every logit.
    return logp, entropy_BT(logits_BTV.float() / temperature)[0]


def grads(loss, leaves):
    return torch.autograd.grad(loss, [x for x in leaves if x is not None], retain_graph=True)


def close(got, want, tol=1e-6):
    """Equal to `tol`, relative to the tensor's largest entry (and absolute below 1)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "N, chunk, temperature",
    [
        (1, 1, 1.0),
        (12, 4, 1.0),  # chunk divides N
        (13, 4, 0.7),  # it does not: a short last chunk
        (13, 5, 1.3),
        (7, 64, 0.6),  # chunk > N: one chunk
        (50, 1, 1.0),  # a chunk per position
    ],
)
def test_values_and_gradients_match_the_plain_path(N, chunk, temperature, bias):
    hidden, weight, bias_V, tokens, c_logp, c_ent = make(N, 16, 97, bias=bias, seed=N * 31 + chunk)
    leaves = (hidden, weight, bias_V)

    logp, ent = hidden_logprobs(
        hidden, weight, tokens, temperature=temperature, chunk=chunk, with_entropy=True, bias_V=bias_V
    )
    want_logp, want_ent = plain(hidden, weight, bias_V, tokens, temperature)
    close(logp, want_logp)
    close(ent, want_ent)
    assert logp.dtype == ent.dtype == torch.float32

    got = grads((c_logp * logp + c_ent * ent).sum(), leaves)
    want = grads((c_logp * want_logp + c_ent * want_ent).sum(), leaves)
    for g, w in zip(got, want):
        close(g, w)
    # Each term on its own, and logp alone without entropy: catches a wrong sign or a missing
    # term that the mixed loss could hide.
    for pick in (0, 1):
        got = grads((c_logp * logp, c_ent * ent)[pick].sum(), leaves)
        want = grads((c_logp * want_logp, c_ent * want_ent)[pick].sum(), leaves)
        for g, w in zip(got, want):
            close(g, w)
    logp_only, none = hidden_logprobs(hidden, weight, tokens, temperature=temperature, chunk=chunk, bias_V=bias_V)
    assert none is None
    close(logp_only, want_logp)
    for g, w in zip(grads((c_logp * logp_only).sum(), leaves), grads((c_logp * want_logp).sum(), leaves)):
        close(g, w)


def test_gradcheck_float64():
    hidden, weight, bias_V, tokens, _, _ = make(5, 3, 7, bias=True, dtype=torch.float64)

    def f(h, w, b):
        return hidden_logprobs(h, w, tokens, temperature=0.8, chunk=2, with_entropy=True, bias_V=b)

    assert torch.autograd.gradcheck(f, (hidden, weight, bias_V))


def test_only_what_needs_grad_gets_one():
    """A frozen LM head (LoRA) gets no weight gradient; hidden still does, and matches."""
    hidden, weight, _, tokens, c_logp, _ = make(9, 8, 31, bias=False)
    weight.requires_grad_(False)
    logp, _ = hidden_logprobs(hidden, weight, tokens, chunk=4)
    (g,) = grads((c_logp * logp).sum(), (hidden,))
    (w,) = grads((c_logp * plain(hidden, weight, None, tokens, 1.0)[0]).sum(), (hidden,))
    close(g, w)
    with torch.no_grad():
        logp, ent = hidden_logprobs(hidden, weight, tokens, chunk=4, with_entropy=True)
    assert not logp.requires_grad and not ent.requires_grad


def test_no_positions():
    hidden, weight, bias_V, tokens, _, _ = make(0, 8, 31, bias=True)
    logp, ent = hidden_logprobs(hidden, weight, tokens, chunk=4, with_entropy=True, bias_V=bias_V)
    assert logp.shape == ent.shape == (0,)
    g_h, g_w, g_b = grads((logp.sum() + ent.sum()), (hidden, weight, bias_V))
    assert g_h.shape == (0, 8) and torch.equal(g_w, torch.zeros_like(weight)) and torch.equal(g_b, torch.zeros_like(bias_V))


def test_bf16_matmul_fp32_softmax():
    """bf16 inputs: matmul in bf16, softmax in fp32, as token_logprobs does with bf16 logits;
    the gradients come back in bf16."""
    hidden, weight, bias_V, tokens, c_logp, c_ent = make(11, 16, 97, bias=True, dtype=torch.bfloat16)
    logp, ent = hidden_logprobs(hidden, weight, tokens, temperature=0.9, chunk=4, with_entropy=True, bias_V=bias_V)
    want_logp, want_ent = plain(hidden, weight, bias_V, tokens, 0.9, chunk=4)
    assert logp.dtype == torch.float32
    close(logp, want_logp)  # the same bf16 logits, the same fp32 math (bf16 math would be ~1e-2 off)
    close(ent, want_ent)
    whole_logp, _ = plain(hidden, weight, bias_V, tokens, 0.9)
    close(logp, whole_logp, tol=2e-2)  # one [N, V] bf16 matmul: up to a bf16 ulp of the logits
    c_logp, c_ent = c_logp.float(), c_ent.float()
    got = grads((c_logp * logp + c_ent * ent).sum(), (hidden, weight, bias_V))
    want = grads((c_logp * want_logp + c_ent * want_ent).sum(), (hidden, weight, bias_V))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        close(g.float(), w.float(), tol=2e-2)  # bf16 rounding; the weight's is summed over chunks in fp32


def test_under_autocast_as_f_linear_would():
    """fp32 leaves under bf16 autocast (the RL trainer on accelerators): logits in bf16 as
    F.linear would make them, backward recomputes the same bf16 logits, grads in fp32."""
    hidden, weight, bias_V, tokens, c_logp, c_ent = make(11, 16, 97, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = hidden_logprobs(hidden, weight, tokens, chunk=4, with_entropy=True, bias_V=bias_V)
        want_logp, want_ent = plain(hidden, weight, bias_V, tokens, 1.0, chunk=4)
    close(logp, want_logp)
    close(ent, want_ent)
    got = grads((c_logp * logp + c_ent * ent).sum(), (hidden, weight, bias_V))
    want = grads((c_logp * want_logp + c_ent * want_ent).sum(), (hidden, weight, bias_V))
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        close(g, w, tol=2e-2)
    without = hidden_logprobs(hidden, weight, tokens, chunk=4, bias_V=bias_V)[0]
    assert (without - logp).abs().max() > 1e-4  # autocast did change the logits: the test sees it


# ----------------------------------------------------------------------------- memory


class Memory(TorchDispatchMode):
    """While active: the largest tensor any aten op made, and the peak bytes held at once by
    storages of at least `min_numel` elements (forward and backward alike; a storage counts
    from the op that made it until the last tensor on it is freed)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel, self.largest, self.live, self.peak = min_numel, 0, 0, 0
        self.tensors = {}  # storage data_ptr -> live tensors on it

    def _freed(self, key, nbytes):
        self.tensors[key] -= 1
        if not self.tensors[key]:
            del self.tensors[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            self.largest = max(self.largest, t.numel())
            storage = t.untyped_storage()
            if storage.nbytes() >= self.min_numel * t.element_size():
                key = storage.data_ptr()
                if key not in self.tensors:
                    self.tensors[key] = 0
                    self.live += storage.nbytes()
                self.tensors[key] += 1
                weakref.finalize(t, self._freed, key, storage.nbytes())
                self.peak = max(self.peak, self.live)
        return out


def saved_by_forward(fn):
    """Run fn() and return (its result, the element counts of the tensors autograd saved)."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_the_memory_checks_catch_the_plain_path():
    """The checks below would fail for the [N, V] logits (smaller sizes, same checks)."""
    N, V = 256, 3000
    hidden, weight, _, tokens, _, _ = make(N, 8, V, bias=False)
    with Memory(V) as forward:
        (logp, ent), saved = saved_by_forward(lambda: plain(hidden, weight, None, tokens, 0.7))
    assert max(saved) >= N * V and forward.peak >= N * V * 4
    with Memory(V) as backward:
        (logp + ent).sum().backward()
    assert backward.largest >= N * V and backward.peak >= N * V * 4


@pytest.mark.parametrize("with_entropy", [False, True])
def test_forward_saves_no_logits_and_both_passes_hold_two_chunks_at_most(with_entropy):
    N, H, V, chunk = 2048, 8, 50_000, 256
    hidden, weight, bias_V, tokens, c_logp, c_ent = make(N, H, V, bias=True)
    with Memory(V) as forward:
        (logp, ent), saved = saved_by_forward(
            lambda: hidden_logprobs(
                hidden, weight, tokens, temperature=0.7, chunk=chunk, with_entropy=with_entropy, bias_V=bias_V
            )
        )
    # inputs (hidden N*H, weight V*H, bias V, tokens N) and 3 scalars per position, nothing [N, V]
    assert max(saved) <= max(N * H, V * H)
    assert sum(saved) <= N * H + V * H + V + 4 * N
    chunk_bytes = chunk * V * 4
    # nor made or kept one on the way (on ctx, say): one chunk's logits and one temporary
    assert forward.largest <= chunk * V and forward.peak <= 2 * chunk_bytes
    with Memory(V) as backward:
        (c_logp * logp + (c_ent * ent if with_entropy else 0)).sum().backward()
    # one [chunk, V] buffer for logp alone, two with the entropy; [V, H] + [V]: grad_weight and
    # grad_bias, their temporaries, and the inputs (views of them count: F.linear transposes the
    # weight). A chunk's buffers still referenced when the next chunk's logits come would exceed it.
    assert backward.largest <= chunk * V < N * V
    assert backward.peak <= (2 if with_entropy else 1) * chunk_bytes + (V * H + V) * 4 * 3
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape and bias_V.grad.shape == bias_V.shape


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"chunk": 0}, "chunk"),
        ({"chunk": 2.0}, "chunk"),
        ({"bias_V": torch.zeros(5)}, "bias_V"),
    ],
)
def test_bad_arguments_say_what_to_do(kwargs, match):
    hidden, weight, _, tokens, _, _ = make(4, 8, 31, bias=False)
    with pytest.raises(KeelError, match=match):
        hidden_logprobs(hidden, weight, tokens, **kwargs)


def test_bad_shapes_and_dtypes_say_what_to_do():
    hidden, weight, _, tokens, _, _ = make(4, 8, 31, bias=False)
    with pytest.raises(KeelError, match="reshape"):
        hidden_logprobs(hidden.unsqueeze(0), weight, tokens)
    with pytest.raises(KeelError, match="tokens_N"):
        hidden_logprobs(hidden, weight, tokens[:3])
    with pytest.raises(KeelError, match="dtype"):
        hidden_logprobs(hidden.double(), weight, tokens)
