"""Turning live training objects into (tensors, JSON) and back, exactly.

Tensors go to safetensors (under sync: fsdp the model's and optimizer's through DCP, keyed by
parameter name: `sharded_state`) and everything else to JSON.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor

from keel.device import accelerator_rng_states, set_accelerator_rng_states
from keel.errors import KeelError

# A full state (a single process's or DDP's checkpoint) loaded into a model sharded by FSDP2: every
# rank reads the full tensors and keeps its own shards.
FULL = StateDictOptions(full_state_dict=True)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def holds_shards(tensors) -> bool:
    return any(isinstance(t, DTensor) for t in tensors.values())


def optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state keyed by parameter index (under FSDP each rank's own shards, as
    DTensors: the training loop writes those through DCP, see `sharded_state`). `model` is unused
    and kept for the trainers' calls."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                         model: torch.nn.Module | None = None) -> None:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    if model is not None and is_sharded(model) and not holds_shards(tensors):  # a full state (ddp, one process)
        names = {p: name for name, p in model.named_parameters()}
        fqns = [names[p] for g in optimizer.param_groups for p in g["params"]]
        full = {"state": {fqns[i]: slots for i, slots in state.items()},
                "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in meta["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, full, options=FULL)  # every rank keeps its own shards
        return
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, with_optimizer: bool | None = None
                  ) -> tuple[dict, dict]:
    """Model and optimizer as DCP writes them, keyed by parameter name so that any number of ranks
    can load them: ({"model": {name: t}, "optimizer": {name: {slot: t}}}, {"param_groups",
    "scalars"}) from torch's get_state_dict, each rank's own shards under FSDP (DTensors, no
    copy), the plain tensors in one process. Before the optimizer's first step its state is empty
    and left so (param_groups None): torch would create it by taking a step of zero gradients,
    which moves AdamW's step count. `with_optimizer` forces that step (load targets for a
    checkpoint that has optimizer state)."""
    model_sd = get_model_state_dict(model)
    if not (optimizer.state if with_optimizer is None else with_optimizer):
        return {"model": model_sd, "optimizer": {}}, {"param_groups": None, "scalars": {}}
    if with_optimizer and not optimizer.state:
        optimizer.zero_grad(set_to_none=True)  # torch skips that step where gradients exist (none do between steps)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    slots = {name: {k: v for k, v in s.items() if torch.is_tensor(v)} for name, s in optim_sd["state"].items()}
    scalars = {name: {k: v for k, v in s.items() if not torch.is_tensor(v)} for name, s in optim_sd["state"].items()}
    scalars = {name: values for name, values in scalars.items() if values}
    return {"model": model_sd, "optimizer": slots}, {"param_groups": optim_sd["param_groups"], "scalars": scalars}


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Load what `sharded_state` gave (its tensors filled by DCP) into the model and optimizer."""
    if meta["param_groups"] is None:  # saved before the optimizer's first step
        set_model_state_dict(model, tensors["model"])
        optimizer.state.clear()
        return
    state = {name: {**slots, **meta["scalars"].get(name, {})} for name, slots in tensors["optimizer"].items()}
    set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Python, NumPy, torch CPU and every accelerator's global RNG."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    for i, s in enumerate(accelerator_rng_states()):
        tensors[f"accelerator_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    set_accelerator_rng_states([tensors[k] for k in sorted(tensors) if k.startswith("accelerator_")])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def model_state(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors for a checkpoint: all of them, or (`trainable_only`, LoRA) only the
    parameters that train; the frozen rest is reloaded from the model directory on resume.
    A sharded model gives each rank's own shards (DTensors: the training loop writes those through
    DCP)."""
    if is_sharded(model):
        state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=trainable_only))
        if trainable_only:  # a tied head's second name comes through ignore_frozen_params: the parameters' own names
            names = {name for name, p in model.named_parameters() if p.requires_grad}
            state = {name: t for name, t in state.items() if name in names}
        return state
    if trainable_only:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}
    # Tied weights appear under two names; safetensors refuses shared storage, flatten() copies.
    return dict(model.state_dict())


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], trainable_only: bool = False) -> None:
    if trainable_only:
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(tensors) != names:
            raise KeelError(f"the checkpoint holds {len(tensors)} trainable tensors and the model {len(names)} "
                            f"(e.g. {sorted(set(tensors) ^ names)[:2]}): resume with the lora settings that "
                            "wrote it, or start a fresh run", field="lora")
        try:
            if is_sharded(model):  # this rank's shards of the adapters; the frozen base is the model directory's
                set_model_state_dict(model, tensors, options=StateDictOptions(strict=False))
            else:
                model.load_state_dict(tensors, strict=False)
        except RuntimeError as e:  # shapes differ: another rank r
            raise KeelError(f"the checkpoint's adapters do not fit this model ({str(e).splitlines()[-1].strip()}): "
                            "resume with the lora settings that wrote it", field="lora") from None
        return
    if is_sharded(model):  # its own shards, or the full tensors (a ddp checkpoint) of which each rank keeps its own
        set_model_state_dict(model, tensors, options=StateDictOptions() if holds_shards(tensors) else FULL)
        return
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # only a tied head may be absent


def frozen_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's frozen parameters (names, dtypes, shapes, bytes): what a checkpoint
    that stores only the trainable tensors (LoRA) was trained on top of, so a resume on other base
    weights fails instead of continuing on them silently."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def check_frozen(saved: str | None, digest: str | None) -> None:
    """KeelError unless a checkpoint's frozen-weights digest (`saved`, None: it holds every weight)
    matches this run's (`digest`, None: no LoRA)."""
    if (saved is None) != (digest is None):
        wrote, runs = ("with", "without") if digest is None else ("without", "with")
        raise KeelError(f"the checkpoint was written by a run {wrote} lora and this run is {runs}: resume with "
                        "the recipe that wrote it, or start a fresh run", field="lora")
    if saved != digest:
        raise KeelError("the checkpoint's adapters were trained on other base weights than this run's model: "
                        "resume with the --model the run started from, or start a fresh run", field="model")
