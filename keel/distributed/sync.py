"""How the ranks keep their weights in step.

    Sync     one process: nothing to synchronise (also the base of the two below)
    DDP      gradients averaged over ranks after every backward, in one flat all-reduce;
             every rank then takes the same optimizer step and holds the same weights
    DiLoCo   every rank takes `inner_steps` steps of its own optimizer on its own data; then the
             pseudo-gradient (global weights minus local weights) is averaged over ranks and
             applied to the global weights by an outer Nesterov SGD, and every rank continues
             from the new global weights (Douillard et al., "DiLoCo", 2023). It sends one model's
             worth of bytes per `inner_steps` steps instead of one per step.
    FSDP     torch's FSDP2 (`fully_shard` on each decoder layer, then the root): every rank holds
             1/N of the weights, gradients and optimizer state; a layer's weights are all-gathered
             for its forward and backward, its gradients reduce-scattered (averaged over ranks)
             during the backward. The ranks' gathered weights are the same, as under DDP.

DiLoCo with inner_steps 1, outer_lr 1 and no momentum is DDP when the inner optimizer is linear in
the gradient (SGD without clipping) and the ranks' batches weigh the same (GRPO: as many sequences
on each rank): the mean of the ranks' `w - lr * g_r` is `w - lr * mean(g_r)`. Between syncs a
DiLoCo rank minimises its own batch's mean loss; DDP weighs each rank's loss by its share of the
global batch (`share`). With AdamW inside (keel's optimizer) each DiLoCo rank keeps its own
moments, as the paper does.

The trainers call `grads` between backward and the optimizer step, `share` to weight their loss,
`passes` for how many micro-batch passes to run (FSDP: as many on every rank), and the training
loop calls `finish` once per step (the outer step when due, metrics averaged over ranks, the
step's communication figures).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from keel.config import DistributedConfig
from keel.distributed.comm import Comm
from keel.distributed.world import World, init_world
from keel.errors import KeelError

# How a metrics row is combined over ranks; every rank sends the same vector, marking what it
# lacks. Keys not listed (step, lr, stage, ...) are the same on every rank and kept as they are.
SUM = ("sampled", "groups", "tokens", "tokens_per_s")
MEAN = ("loss", "reward", "reward_correct", "reward_format", "accuracy", "response_length", "truncated",
        "clip_frac", "kl", "entropy", "grad_norm", "step_s", "rollout_s",
        "mismatch_kl", "mismatch_k3", "correction_share", "ess", "weight_sync_s")  # another rollout backend
REDUCED = SUM + MEAN


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat_(vec: torch.Tensor, into: list[torch.Tensor]) -> None:
    """Copy slices of `vec` into the tensors `into`, in order."""
    offset = 0
    for t in into:
        t.copy_(vec[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class Sync:
    """A single process, or the shared behaviour of the distributed modes."""
    rank_local: tuple[str, ...] = ("rng", "data")  # checkpoint parts that differ between ranks

    def __init__(self, model: torch.nn.Module, comm: Comm):
        self.comm, self.world = comm, comm.world
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.world.size > 1:  # every rank starts from rank 0's weights
            with torch.no_grad():
                vec = self.comm.broadcast(flat([p.detach() for p in self.params]).to(comm.device), "setup")
                unflat_(vec, self.params)

    def grads(self) -> None:
        """Between backward and the optimizer step."""

    def any(self, flag: bool) -> bool:
        """Whether any rank whose gradients this rank averages with has `flag` set."""
        return flag

    def share(self, n: float) -> float:
        """This rank's weight for a loss averaged over `n` local units (tokens or sequences), so
        that the ranks' averaged gradients are those of the mean over all their units."""
        return 1.0

    def passes(self, n: int) -> int:
        """How many forward and backward passes this rank runs for its `n` micro-batches: `n`,
        but under FSDP every rank's passes run the same collectives, so the most of any rank (the
        extra ones carry zero weight)."""
        return n

    def finish(self, row: dict, step: int, final: bool) -> dict:
        """After each step: the outer step when due, the row averaged over ranks, comm figures."""
        start = time.perf_counter()
        self.after_step(step, final)
        if self.world.size > 1:
            row = self.reduce(row)
        row.update(self.comm.take_step())
        if "step_s" in row:
            row["step_s"] += time.perf_counter() - start
        return row

    def after_step(self, step: int, final: bool) -> None:
        pass

    def reduce(self, row: dict) -> dict:
        vals = torch.tensor([float(row.get(k, 0.0)) for k in REDUCED] + [float(k in row) for k in REDUCED],
                            dtype=torch.float64, device=self.comm.device)
        total = self.comm.all_reduce(vals, "metrics").tolist()
        out = dict(row)
        for i, key in enumerate(REDUCED):
            present = total[len(REDUCED) + i]
            if present:
                out[key] = total[i] if key in SUM else total[i] / present
            if isinstance(row.get(key), int):
                out[key] = int(out[key])
        return out

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, for choices that must be the same on every rank but depend on its clock."""
        if self.world.size == 1:
            return flag
        return bool(self.comm.broadcast(torch.tensor([int(flag)], device=self.comm.device), "control").item())

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pass

    def unshard_model(self) -> None:
        """After training, on every rank: leave a plain model with its full weights (FSDP gathers them)."""


class DDP(Sync):
    def grads(self) -> None:
        if self.world.size == 1:
            return
        # One bucket for the whole model: fewer, larger messages. A parameter without a gradient
        # this step (an unused head, a skipped rank) contributes zeros, so every rank sends the same shape.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        vec = self.comm.all_reduce(flat(grads).to(self.comm.device), "grads")
        vec /= self.world.size
        for p, g in zip(self.params, grads):
            p.grad = g
        unflat_(vec, [p.grad for p in self.params])

    def any(self, flag: bool) -> bool:
        return flag if self.world.size == 1 else self.comm.scalar(float(flag), "control") > 0

    def share(self, n: float) -> float:
        if self.world.size == 1:
            return 1.0
        total = self.comm.scalar(n, "control")
        return n * self.world.size / total if total else 0.0


class DiLoCo(Sync):
    rank_local = ("rng", "data", "model", "optimizer")  # between syncs each rank has its own

    def __init__(self, model: torch.nn.Module, comm: Comm, cfg: DistributedConfig):
        super().__init__(model, comm)
        self.cfg = cfg
        self.global_params = [p.detach().clone() for p in self.params]
        m = cfg.outer_momentum
        self.outer = torch.optim.SGD(self.global_params, lr=cfg.outer_lr, momentum=m, nesterov=m > 0)

    def after_step(self, step: int, final: bool) -> None:
        if step % self.cfg.inner_steps and not final:
            return
        with torch.no_grad():
            pseudo = flat([g - p.detach() for g, p in zip(self.global_params, self.params)])
            mean = self.average(pseudo)
            for g in self.global_params:
                g.grad = torch.empty_like(g)
            unflat_(mean, [g.grad for g in self.global_params])
        self.outer.step()
        with torch.no_grad():
            for p, g in zip(self.params, self.global_params):
                p.copy_(g)

    def average(self, vec: torch.Tensor) -> torch.Tensor:
        """The mean of every rank's `vec`, sent as fp32, bf16 or int8 with one scale per tensor.
        Compressed payloads are all-gathered and summed in fp32 on every rank (a low-precision
        sum would round at every hop); every rank decodes the same bytes, its own included, so
        the ranks' global weights stay identical."""
        n, kind = self.world.size, self.cfg.compress
        if kind == "none":
            return self.comm.all_reduce(vec.to(self.comm.device), "pseudo_grads").to(vec.device) / n
        if kind == "bf16":
            parts = self.comm.all_gather(vec.to(self.comm.device, torch.bfloat16), "pseudo_grads")
            return torch.stack([p.float() for p in parts]).mean(0).to(vec.device)
        sizes = [p.numel() for p in self.params]
        scales = torch.stack([c.abs().max() for c in vec.split(sizes)]).clamp(min=1e-30) / 127
        q = torch.cat([(c / s).round().to(torch.int8) for c, s in zip(vec.split(sizes), scales)])
        qs = self.comm.all_gather(q.to(self.comm.device), "pseudo_grads")
        ss = self.comm.all_gather(scales.float().to(self.comm.device), "pseudo_grads")
        total = sum(torch.cat([c.float() * s for c, s in zip(qk.to(vec.device).split(sizes), sk.to(vec.device))])
                    for qk, sk in zip(qs, ss))
        return total / n

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"global.{i}": g for i, g in enumerate(self.global_params)}
        for i, g in enumerate(self.global_params):
            buf = self.outer.state.get(g, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{i}"] = buf
        return tensors, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        with torch.no_grad():
            for i, g in enumerate(self.global_params):
                g.copy_(tensors[f"global.{i}"])
                if f"momentum.{i}" in tensors:
                    self.outer.state[g]["momentum_buffer"] = tensors[f"momentum.{i}"].to(g.device).clone()


class FSDP(DDP):
    """FSDP2 over the ranks; with one process, nothing to shard (the plain model, as DDP).

    The loss weights are DDP's (`share`): FSDP's reduce-scatter divides the sum of the ranks'
    gradients by the world size, as DDP's all-reduce does, so rank r's loss times
    `n_r * ranks / n_total` gives the gradient of the mean over every rank's units. FSDP's own
    collectives do not pass through `Comm`, so `comm_bytes` counts only keel's (metrics, control).
    The trainers build their optimizer after this (over the sharded DTensor parameters), and
    keel.resilience.state gathers full model and optimizer state for checkpoints."""

    def __init__(self, model: torch.nn.Module, comm: Comm, device: torch.device):
        super().__init__(model, comm)  # every rank starts from rank 0's (full) weights
        self.model = model
        if self.world.size == 1:
            return
        # bf16 weights for the compute and fp32 gradient reduction on accelerators; the sharded
        # fp32 parameters stay the optimizer's master copy. CPU: fp32 throughout (exactness tests).
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type != "cpu" else MixedPrecisionPolicy())
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        self.params = [p for p in model.parameters() if p.requires_grad]  # now DTensors

    def grads(self) -> None:
        """FSDP has reduce-scattered the gradients during the backward."""

    def passes(self, n: int) -> int:
        if self.world.size == 1:
            return n
        return int(self.comm.scalar(n, "control", op=dist.ReduceOp.MAX))

    def unshard_model(self) -> None:
        """Turn the sharded model back into a plain one holding the full weights on every rank
        (collective), so rank 0 can write OUT/model after the process group is gone. FSDP2 has no
        public inverse of `fully_shard`: its hooks are removed and the original classes restored."""
        if self.world.size == 1:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        for module in self.model.modules():
            if not isinstance(module, FSDPModule):
                continue
            state = fully_shard.state(module)
            state._pre_forward_hook_handle.remove()
            state._post_forward_hook_handle.remove()
            group = state._fsdp_param_group
            if group is not None:
                for handles in (group._module_to_pre_save_state_dict_hook_handle,
                                group._module_to_pre_load_state_dict_hook_handle):
                    for handle in handles.values():
                        handle.remove()
                for fsdp_param in group.fsdp_params:
                    fsdp_param._post_load_hook_handle.remove()
            module.__class__ = type(module).__bases__[1]  # FSDP<Cls>(FSDPModule, Cls) -> Cls
        with torch.no_grad():
            for name, param in list(self.model.named_parameters()):
                owner, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(owner)
                module._parameters[leaf] = torch.nn.Parameter(full[name], requires_grad=param.requires_grad)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks to shard one by one: the classes the model names as never to be
    split across devices (`_no_split_modules`, transformers' own list), else `model.model.layers`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = list(getattr(getattr(model, "model", None), "layers", None) or ())
    if not layers:
        raise KeelError(f"sync: fsdp found no decoder layers in {type(model).__name__} (no _no_split_modules, "
                        "no model.layers): use sync: ddp", field="distributed.sync")
    return layers


def make_sync(cfg: DistributedConfig, model: torch.nn.Module, device: torch.device) -> Sync:
    """Join the process group (under torchrun) and return the configured synchroniser. Build the
    optimizer after this: under fsdp it must hold the sharded parameters."""
    world = init_world(device)
    comm = Comm(world, device, cfg.link_gbps, cfg.link_latency_ms)
    if cfg.sync == "diloco":
        return DiLoCo(model, comm, cfg)
    if cfg.sync == "fsdp":
        return FSDP(model, comm, device)
    return DDP(model, comm)
