"""Turning live training objects into (tensors, JSON) and back, exactly.

Tensors go to safetensors and everything else to JSON, so a checkpoint never needs pickle.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from keel.device import accelerator_rng_states, set_accelerator_rng_states
from keel.errors import KeelError


# A model sharded by FSDP2 (sync: fsdp) goes into the same checkpoint layout as a single process:
# its full state gathered to rank 0 (collective: every rank calls these), and each rank takes its
# shards back on load. Sharded checkpoints written by every rank through DCP are the next step.
FULL_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
FULL = StateDictOptions(full_state_dict=True)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state keyed by parameter index; `model` (a sharded one: gathered on rank 0,
    empty elsewhere) is needed only under FSDP."""
    if model is not None and is_sharded(model):
        sd = get_optimizer_state_dict(model, optimizer, options=FULL_ON_MAIN)
        if not sd:
            return {}, {"param_groups": [], "scalars": {}}
        # DCP keys the state by parameter name; the checkpoint by index, as optimizer.state_dict() does.
        index = {fqn: i for i, fqn in enumerate(fqn for g in sd["param_groups"] for fqn in g["params"])}
        sd = {"state": {index[fqn]: slots for fqn, slots in sd["state"].items()},
              "param_groups": [{**g, "params": [index[fqn] for fqn in g["params"]]} for g in sd["param_groups"]]}
    else:
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
    if model is not None and is_sharded(model):
        names = {p: name for name, p in model.named_parameters()}
        fqns = [names[p] for g in optimizer.param_groups for p in g["params"]]
        full = {"state": {fqns[i]: slots for i, slots in state.items()},
                "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in meta["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, full, options=FULL)  # every rank keeps its own shards
        return
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


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
    A sharded model's full state is gathered to rank 0 (the other ranks get an empty dict); the
    config refuses lora with sync: fsdp."""
    if is_sharded(model):
        return get_model_state_dict(model, options=FULL_ON_MAIN)
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
            model.load_state_dict(tensors, strict=False)
        except RuntimeError as e:  # shapes differ: another rank r
            raise KeelError(f"the checkpoint's adapters do not fit this model ({str(e).splitlines()[-1].strip()}): "
                            "resume with the lora settings that wrote it", field="lora") from None
        return
    if is_sharded(model):  # every rank read the full tensors; each keeps its own shards
        set_model_state_dict(model, tensors, options=FULL)
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
