"""Does a candidate backend compute what the reference computes? Measured on a task's test prompts.

For each candidate against the reference:
- max |delta logit| over every prompt position (one prefill per prompt, fp32 logits);
- greedy agreement: the share of prompts whose greedy completions match exactly, and where the
  first divergence happens;
- top-k containment at the first divergence, as vLLM's `check_logprobs_close` judges parity: up
  to that point both saw the same tokens, so each side's token there must be among the other's
  top-k (a near-tie that rounding flipped), else the backends really disagree;
- task accuracy of each backend's greedy completions.

Generation goes through `keel.engine.batching.generate`: the serving engine, sampler and stop
rules themselves are what is checked.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from keel.config import ParityConfig
from keel.errors import KeelError
from keel.io import atomic_write
from keel.engine.sampler import SamplingParams
from keel.engine.batching import generate


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


def run_backend(backend, prompts, examples, task, tokenizer, eos_id: int, cfg: ParityConfig) -> dict:
    """Greedy completions with per-step top-k ids, their task accuracy and throughput."""
    generate(backend, prompts[:2], SamplingParams(0.0, 1.0, 2), eos_id=eos_id)  # warm-up, not timed
    start = time.perf_counter()
    reqs = generate(backend, prompts, SamplingParams(0.0, 1.0, cfg.max_new_tokens), eos_id=eos_id,
                    max_batch=cfg.batch, top_k=cfg.top_k)
    wall = time.perf_counter() - start
    texts = [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in reqs]
    correct = [bool(task.reward(t, ex)["correct"]) for t, ex in zip(texts, examples)]
    return {"tokens": [r.tokens for r in reqs], "topk": [r.topk for r in reqs], "texts": texts,
            "accuracy": sum(correct) / len(correct), "tokens_per_s": sum(len(r.tokens) for r in reqs) / wall}


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
            if r["max_abs_logit_delta"] > cfg.max_logit_delta_same_dtype:
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
    called as each of its 1 + 2 x candidates phases starts (keel.runlog.phases shows them)."""
    from keel.models import render_prompt, special_ids
    from keel.tasks import get_task

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
        row = {"max_abs_logit_delta": prompt_logit_delta(reference, cand, prompts),
               **compare_greedy(ref["tokens"], ref["topk"], run["tokens"], run["topk"]),
               "accuracy": run["accuracy"], "accuracy_drop": ref["accuracy"] - run["accuracy"],
               "tokens_per_s": run["tokens_per_s"]}
        result["candidates"][cand.name] = row
    return result


def format_table(result: dict) -> str:
    ref = result["reference"]
    head = (f"reference {ref['backend']}: accuracy {ref['accuracy']:.3f}, "
            f"{ref['tokens_per_s']:.0f} tok/s  ({result['n']} prompts x {result['max_new_tokens']} new tokens, "
            f"{result['task']})")
    cols = ["candidate", "max|dlogit|", "greedy match", "1st div (min/med)", f"top-{result['top_k']} at div",
            "accuracy", "tok/s"]
    rows = []
    for name, r in result["candidates"].items():
        div = "-" if r["first_divergence_min"] is None else f"{r['first_divergence_min']}/{r['first_divergence_median']:g}"
        rows.append([name, f"{r['max_abs_logit_delta']:.2e}", f"{100 * r['greedy_match']:.1f}%", div,
                     f"{100 * r['topk_containment']:.1f}%", f"{r['accuracy']:.3f}", f"{r['tokens_per_s']:.0f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([head, line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows])


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

    if not candidates:
        raise KeelError("no candidate backend given: name at least one, e.g. onnxruntime:cpu:fp32",
                        field="candidates")
    check_model_dir(model_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    specs = [reference, *candidates]
    with phases("parity", len(specs) + 1 + 2 * len(candidates)) as begin:
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
