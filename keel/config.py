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

LOSSES = ("grpo", "dr_grpo", "dapo", "gspo")


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise KeelError(msg)


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
class SFTConfig:
    """Cold-start supervised training on reasoning traces, loss on the completion only."""
    task: str = "arithmetic"     # task name or a .jsonl/.parquet file with question/answer/trace
    task_options: dict = field(default_factory=dict)  # e.g. {digits: 3}
    examples: int = 1000         # training traces drawn from the task's train split
    drop_thinking: float = 0.0   # fraction of traces reduced to the bare answer (mixed-quality data)
    steps: int = 300             # optimizer steps
    batch_tokens: int = 4096     # tokens per packed batch (sequences are packed, no padding)
    lr: float = 3e-3             # peak AdamW learning rate
    warmup: int = 20             # linear warm-up steps, then cosine decay to 10%
    weight_decay: float = 0.0
    grad_clip: float = 1.0       # max global grad norm
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | npu | xpu | mps
    dtype: str = "auto"          # auto (bf16 where the device has it, else fp32) | fp32 | bf16 | fp16
    log_every: int = 10

    def __post_init__(self):
        _require(self.examples >= 1 and self.steps >= 1, "sft: examples and steps must be >= 1")
        _require(self.batch_tokens >= 16, "sft: batch_tokens must be >= 16")
        _require(0 <= self.drop_thinking <= 1, "sft: drop_thinking must be in [0, 1]")
        _require(self.lr > 0 and self.warmup >= 0 and self.grad_clip > 0, "sft: lr and grad_clip must be > 0, warmup >= 0")


@dataclass(frozen=True)
class RLConfig:
    """RL from verifiable rewards with the GRPO family."""
    task: str = "arithmetic"
    task_options: dict = field(default_factory=dict)
    loss: str = "grpo"           # grpo | dr_grpo | dapo | gspo
    steps: int = 60              # rollout batches
    prompts_per_step: int = 8    # distinct prompts per rollout batch
    group_size: int = 8          # samples per prompt; advantages compare within a group
    updates_per_batch: int = 1   # optimizer steps on each rollout batch (old log-probs kept)
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
    log_every: int = 1

    def __post_init__(self):
        _require(self.loss in LOSSES, f"rl: unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        _require(self.group_size >= 2, f"rl: group_size must be >= 2 (got {self.group_size}): "
                 "GRPO's advantage compares samples of the same prompt")
        _require(self.steps >= 1 and self.prompts_per_step >= 1 and self.updates_per_batch >= 1,
                 "rl: steps, prompts_per_step and updates_per_batch must be >= 1")
        _require(self.lr > 0 and self.grad_clip > 0, "rl: lr and grad_clip must be > 0")
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


def override(cfg, **changes):
    """`cfg` with the non-None `changes` applied and re-validated (CLI flags win over recipes)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return from_dict(type(cfg), {**dataclasses.asdict(cfg), **changes}) if changes else cfg
