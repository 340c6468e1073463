"""Turning live training objects into (tensors, JSON) and back, exactly.

Tensors go to safetensors and everything else to JSON, so a checkpoint never needs pickle.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from keel.device import accelerator_rng_states, set_accelerator_rng_states


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
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


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied weights appear under two names; safetensors refuses shared storage, flatten() copies.
    return dict(model.state_dict())


def load_model_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in k for k in missing), missing  # only a tied head may be absent
