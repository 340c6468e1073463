"""Does a candidate backend compute what the reference computes? Measured on a task's test prompts.

For each candidate against the reference:
- max |delta logit| over every prompt position (one prefill per prompt, fp32 logits);
- greedy agreement: the share of prompts whose greedy completions match exactly, and where the
  first divergence happens;
- top-k containment at the first divergence, as vLLM's `check_logprobs_close` judges parity: up
  to that point both saw the same tokens, so each side's token there must be among the other's
  top-k (a near-tie that rounding flipped), else the backends really disagree;
- task accuracy of each backend's greedy completions;
- the rollout mismatch the candidate would bring to RL as the sampler: completions sampled on it
  at temperature 1 (top-p 1) as an RL rollout samples them, its own recorded log-prob mu of each
  token, and the reference's pi of the same tokens, teacher-forced (one prefill of prompt +
  completion): the trainer's mismatch KL (mean log mu - log pi), the largest |log mu - log pi|,
  and the shares of tokens that TIS would truncate and IcePop drop (`rollout_mismatch`).

Generation goes through `keel.engine.batching.generate` (greedy) and `keel.completions.generate`
(sampled, as RL rollouts): the serving engine, sampler and stop rules themselves are what is
checked. A sampler with its own engine (vLLM, keel.engine.vllm_backend) generates itself; it
returns no logits, so its max |delta logit| is not measured (None) and the same-dtype logit
threshold is not applied to it: its log-probs are compared through the mismatch columns.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from keel import completions
from keel.config import ParityConfig, RLConfig
from keel.correction import correction_weights, mismatch_stats
from keel.errors import KeelError
from keel.io import atomic_write
from keel.engine.sampler import SamplingParams
from keel.engine.batching import generate

# Why a sampler with its own engine has no max |delta logit| (parity.json's `not_measured`).
NO_LOGITS = "vLLM returns log-probs, not logits: see the mismatch columns"
NO_LOGITS_REFERENCE = ("the reference {} returns no logits to compare with or to score the candidates' samples: "
                       "use a torch or onnxruntime reference (e.g. torch:cpu:fp32)")


@torch.no_grad()
def prompt_logit_delta(reference, candidate, prompts: list[list[int]]) -> float:
    """Max |logit difference| over all positions of all prompts (each prefilled alone)."""
    worst = 0.0
    for p in prompts:
        ids = torch.tensor([p])
        mask, pos = torch.ones_like(ids), torch.arange(len(p))[None]
        a, _ = reference.forward(ids, mask, pos, reference.empty_past(1))
        b, _ = candidate.forward(ids, mask, pos, candidate.empty_past(1))
        worst = max(worst, float((a.cpu() - b.cpu()).abs().max()))
    return worst


def greedy_top_k(backend, prompts, eos_id: int, max_new_tokens: int, cfg: ParityConfig):
    """Greedy completions of `prompts` and, per row and step, the ids of the top `cfg.top_k` tokens."""
    params = SamplingParams(0.0, 1.0, max_new_tokens)
    if completions.has_own_engine(backend):
        out, topk = backend.generate_with_top_k(prompts, params, eos_id=eos_id, top_k=cfg.top_k)
        return out.tokens, topk
    reqs = generate(backend, prompts, params, eos_id=eos_id, max_batch=cfg.batch, top_k=cfg.top_k)
    return [r.tokens for r in reqs], [r.topk for r in reqs]


def run_backend(backend, prompts, examples, task, tokenizer, eos_id: int, cfg: ParityConfig) -> dict:
    """Greedy completions with per-step top-k ids, their task accuracy and throughput."""
    greedy_top_k(backend, prompts[:2], eos_id, 2, cfg)  # warm-up, not timed
    start = time.perf_counter()
    tokens, topk = greedy_top_k(backend, prompts, eos_id, cfg.max_new_tokens, cfg)
    wall = time.perf_counter() - start
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    correct = [bool(task.reward(t, ex)["correct"]) for t, ex in zip(texts, examples)]
    return {"tokens": tokens, "topk": topk, "texts": texts,
            "accuracy": sum(correct) / len(correct), "tokens_per_s": sum(map(len, tokens)) / wall}


def sampled_rollouts(sampler, prompts, eos_id: int, cfg: ParityConfig):
    """One completion of each prompt at temperature 1, top-p 1, sampled as an RL rollout is
    (`keel.completions.generate`, chunks of `cfg.batch` rows, one generator seeded `cfg.seed`), with
    the log-prob the sampler records for each token (mu)."""
    params = SamplingParams(1.0, 1.0, cfg.max_new_tokens)
    generator = torch.Generator(device=sampler.device).manual_seed(cfg.seed)
    tokens, logprobs = [], []
    for start in range(0, len(prompts), cfg.batch):
        out = completions.generate(sampler, prompts[start:start + cfg.batch], params, eos_id=eos_id,
                                   generator=generator)
        tokens += out.tokens
        logprobs += out.logprobs
    return tokens, logprobs


@torch.no_grad()
def teacher_forced_logprobs(backend, prompts: list[list[int]], tokens: list[list[int]]) -> list[list[float]]:
    """log pi of each completion token under `backend`: one prefill of prompt + completion per
    sample, log_softmax of the logits that predict each completion token, the token's entry."""
    out = []
    for p, c in zip(prompts, tokens):
        ids = torch.tensor([p + c])
        mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
        logits_1SV, _ = backend.forward(ids, mask, pos, backend.empty_past(1), logits_to_keep=len(c) + 1)
        logp_CV = torch.log_softmax(logits_1SV[0, -len(c) - 1:-1].float().cpu(), -1)
        out.append(logp_CV.gather(-1, torch.tensor(c)[:, None])[:, 0].tolist())
    return out


def rollout_mismatch(log_mu_N: torch.Tensor, log_pi_N: torch.Tensor, *, cap: float, low: float,
                     high: float) -> dict:
    """What an RL run sampling from mu and training pi would log, over N sampled tokens, by the
    trainer's own functions (keel.correction):

    mismatch_kl, mismatch_k3  `mismatch_stats`' k1 (may be < 0) and k3 estimates of KL(mu || pi)
    max_abs_logprob_delta     max |log mu - log pi|
    tis_truncated             share of tokens with pi / mu > cap (TIS truncates their weight at cap)
    icepop_dropped            share of tokens with pi / mu outside [low, high] (IcePop drops them)
    tokens                    N (at least 1: every completion has a token)"""
    log_ratio_1N = (log_pi_N.double() - log_mu_N.double())[None]
    mask_1N = torch.ones_like(log_ratio_1N, dtype=torch.bool)
    weight_1N, truncated_1N = correction_weights(log_ratio_1N, mask_1N, "tis", cap=cap)
    _, dropped_1N = correction_weights(log_ratio_1N, mask_1N, "icepop", low=low, high=high)
    stats = mismatch_stats(log_ratio_1N[0], weight_1N[0], truncated_1N[0])
    return {"mismatch_kl": stats["mismatch_kl"], "mismatch_k3": stats["mismatch_k3"],
            "max_abs_logprob_delta": log_ratio_1N.abs().max().item(),
            "tis_truncated": stats["correction_share"], "icepop_dropped": dropped_1N.double().mean().item(),
            "tokens": log_ratio_1N.numel()}


def candidate_mismatch(reference, candidate, prompts, eos_id: int, cfg: ParityConfig) -> dict:
    """`rollout_mismatch` of `candidate` as the sampler against `reference` as the trainer, with
    the trainer's default TIS cap and IcePop bounds (RLConfig)."""
    tokens, log_mu = sampled_rollouts(candidate, prompts, eos_id, cfg)
    log_pi = teacher_forced_logprobs(reference, prompts, tokens)
    rl = RLConfig()
    flat = lambda rows: torch.tensor([x for row in rows for x in row], dtype=torch.float64)  # noqa: E731
    return rollout_mismatch(flat(log_mu), flat(log_pi), cap=rl.correction_cap, low=rl.icepop_low,
                            high=rl.icepop_high)


def compare_greedy(ref_tokens, ref_topk, cand_tokens, cand_topk) -> dict:
    """Greedy agreement of two runs over the same prompts (see the module docstring)."""
    diverged, contained, positions = 0, 0, []
    for a, ta, b, tb in zip(ref_tokens, ref_topk, cand_tokens, cand_topk):
        if a == b:
            continue
        diverged += 1
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        positions.append(d)
        if d < len(a) and d < len(b) and a[d] in tb[d] and b[d] in ta[d]:
            contained += 1
    n = len(ref_tokens)
    return {"greedy_match": (n - diverged) / n, "diverged": diverged,
            "first_divergence_min": min(positions) if positions else None,
            "first_divergence_median": statistics.median(positions) if positions else None,
            "topk_containment": contained / diverged if diverged else 1.0}


def _dtype(name: str) -> str:
    return name.rsplit(":", 1)[-1]


def check(result: dict, reference: str, cfg: ParityConfig) -> list[str]:
    """The thresholds a candidate fails, as readable lines."""
    fails = []
    for name, r in result["candidates"].items():
        if _dtype(name) == _dtype(reference):
            if r["greedy_match"] < cfg.min_match_same_dtype:
                fails.append(f"{name}: greedy match {r['greedy_match']:.3f} < {cfg.min_match_same_dtype} (same dtype)")
            # None: not measured (a sampler that returns no logits), so no threshold applies
            if r["max_abs_logit_delta"] is not None and r["max_abs_logit_delta"] > cfg.max_logit_delta_same_dtype:
                fails.append(f"{name}: max |delta logit| {r['max_abs_logit_delta']:.2e} > "
                             f"{cfg.max_logit_delta_same_dtype:.0e} (same dtype)")
        if r["topk_containment"] < cfg.min_topk_containment:
            fails.append(f"{name}: top-{cfg.top_k} containment {r['topk_containment']:.3f} < {cfg.min_topk_containment}")
        if r["accuracy_drop"] > cfg.max_accuracy_drop:
            fails.append(f"{name}: accuracy {r['accuracy']:.3f} trails the reference by {r['accuracy_drop']:.3f} "
                         f"> {cfg.max_accuracy_drop}")
    return fails


def parity(reference, candidates: list, tokenizer, cfg: ParityConfig = ParityConfig(),
           on_phase=lambda name: None) -> dict:
    """Compare each candidate backend with the reference on `cfg.n` test prompts of `cfg.task`.
    Returns the parity.json contents (thresholds not applied: see `check`). `on_phase(name)` is
    called as each of its 1 + 3 x candidates phases starts (keel.runlog.phases shows them)."""
    from keel.models import render_prompt, special_ids
    from keel.tasks import get_task

    if completions.has_own_engine(reference):
        raise KeelError(NO_LOGITS_REFERENCE.format(reference.name), field="reference")
    task = get_task(cfg.task, **cfg.task_options)
    examples = task.examples("test", cfg.n, seed=cfg.seed)
    prompts = [render_prompt(tokenizer, ex.question) for ex in examples]
    eos, _ = special_ids(tokenizer)
    on_phase(f"{reference.name}: greedy completions of {cfg.n} prompts")
    ref = run_backend(reference, prompts, examples, task, tokenizer, eos, cfg)
    result = {"reference": {"backend": reference.name, "accuracy": ref["accuracy"],
                            "tokens_per_s": ref["tokens_per_s"]},
              "task": cfg.task, "task_options": cfg.task_options, "n": cfg.n,
              "max_new_tokens": cfg.max_new_tokens, "top_k": cfg.top_k, "candidates": {}}
    for cand in candidates:
        on_phase(f"{cand.name}: greedy completions of {cfg.n} prompts")
        run = run_backend(cand, prompts, examples, task, tokenizer, eos, cfg)
        on_phase(f"{cand.name}: logits beside the reference's, {cfg.n} prompts")
        own = completions.has_own_engine(cand)
        row = {"max_abs_logit_delta": None if own else prompt_logit_delta(reference, cand, prompts),
               **compare_greedy(ref["tokens"], ref["topk"], run["tokens"], run["topk"]),
               "accuracy": run["accuracy"], "accuracy_drop": ref["accuracy"] - run["accuracy"],
               "tokens_per_s": run["tokens_per_s"]}
        if own:
            row["not_measured"] = {"max_abs_logit_delta": NO_LOGITS}
        on_phase(f"{cand.name}: rollout mismatch, {cfg.n} samples at temperature 1 scored by the reference")
        row.update(candidate_mismatch(reference, cand, prompts, eos, cfg))
        result["candidates"][cand.name] = row
    return result


def format_table(result: dict) -> str:
    ref = result["reference"]
    head = (f"reference {ref['backend']}: accuracy {ref['accuracy']:.3f}, "
            f"{ref['tokens_per_s']:.0f} tok/s  ({result['n']} prompts x {result['max_new_tokens']} new tokens, "
            f"{result['task']})")
    cols = ["candidate", "max|dlogit|", "greedy match", "1st div (min/med)", f"top-{result['top_k']} at div",
            "accuracy", "tok/s", "mismatch kl", "max|dlogp|", "tis trunc", "icepop drop"]
    rows, notes = [], []
    for name, r in result["candidates"].items():
        div = "-" if r["first_divergence_min"] is None else f"{r['first_divergence_min']}/{r['first_divergence_median']:g}"
        delta = "-" if r["max_abs_logit_delta"] is None else f"{r['max_abs_logit_delta']:.2e}"
        rows.append([name, delta, f"{100 * r['greedy_match']:.1f}%", div,
                     f"{100 * r['topk_containment']:.1f}%", f"{r['accuracy']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['mismatch_kl']:.2e}", f"{r['max_abs_logprob_delta']:.2e}",
                     f"{100 * r['tis_truncated']:.2f}%", f"{100 * r['icepop_dropped']:.2f}%"])
        notes += [f"{name}: {field} not measured ({why})" for field, why in r.get("not_measured", {}).items()]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    mismatch = ("mismatch: one completion per prompt sampled on the candidate at temperature 1, its log-probs "
                "(mu) beside the reference's teacher-forced ones (pi): mean log mu - log pi, max |log mu - log pi|, "
                "tokens TIS truncates (pi/mu > 2) and IcePop drops (outside [0.5, 5])")
    return "\n".join([head, line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
                     + [mismatch] + notes)


def build_backend(spec: str, model_dir: str | Path, workdir: str | Path):
    """A backend from a spec (`keel.engine.backends.parse_spec`: torch:cpu:bf16, onnxruntime:cpu:int8,
    ...). An onnxruntime backend over an HF directory runs an export made into `workdir` (kept and
    reused while the weights are unchanged): for int8 and int4 that is the rollout sampler's own
    graph, so the report states the mismatch such a sampler brings."""
    from keel.export.onnx import export_onnx
    from keel.engine.backends import ONNX_FILE, OrtBackend, open_backend, parse_spec

    kind, provider, dtype = parse_spec(spec)
    if kind != "onnxruntime" or (Path(model_dir) / ONNX_FILE).is_file():
        return open_backend(spec, model_dir)[0]
    onnx_dir = Path(workdir) / f"onnx-{dtype}"
    if not _export_is_current(onnx_dir, model_dir):
        export_onnx(model_dir, onnx_dir, dtype)
    return OrtBackend(onnx_dir, provider)


def _export_is_current(onnx_dir: Path, model_dir) -> bool:
    """An earlier export of these very weights (same source, newer than every weight file) is reused."""
    from keel.engine.backends import ONNX_FILE, ONNX_META

    try:
        meta = json.loads((onnx_dir / ONNX_META).read_text())
        built = (onnx_dir / ONNX_FILE).stat().st_mtime
    except (OSError, ValueError):
        return False
    weights = [f.stat().st_mtime for f in Path(model_dir).glob("*.safetensors")]
    return meta.get("source") == str(Path(model_dir).resolve()) and bool(weights) and built > max(weights)


def run_parity(model_dir: str | Path, reference: str, candidates: list[str], out: str | Path,
               cfg: ParityConfig = ParityConfig()) -> tuple[dict, list[str]]:
    """The `keel parity` command: build the backends, compare, write OUT/parity.json; returns the
    result and the failed thresholds."""
    from transformers import AutoTokenizer

    from keel.models import check_model_dir
    from keel.runlog import phases

    from keel.engine.backends import parse_spec

    if not candidates:
        raise KeelError("no candidate backend given: name at least one, e.g. onnxruntime:cpu:fp32",
                        field="candidates")
    kinds = [parse_spec(spec)[0] for spec in [reference, *candidates]]  # a bad spec fails before any load
    if kinds[0] == "vllm":
        raise KeelError(NO_LOGITS_REFERENCE.format(reference), field="reference")
    check_model_dir(model_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    specs = [reference, *candidates]
    with phases("parity", len(specs) + 1 + 3 * len(candidates)) as begin:
        backends = []
        for spec in specs:
            begin(f"loading {spec}" + (" (exported to ONNX first, unless done already)"
                                       if spec.startswith("onnxruntime") else ""))
            backends.append(build_backend(spec, model_dir, out))
        result = parity(backends[0], backends[1:], tokenizer, cfg, on_phase=begin)
    ref = backends[0]
    fails = check(result, ref.name, cfg)
    result["failed"] = fails
    atomic_write(out / "parity.json", json.dumps(result, indent=1))
    return result, fails
