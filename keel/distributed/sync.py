"""How the ranks keep their weights in step.

    Sync     one process: nothing to synchronise (also the base of the two below)
    DDP      torch's DistributedDataParallel: gradients averaged over ranks in buckets during
             the step's last backward; every rank then takes the same optimizer step and holds
             the same weights
    DiLoCo   every rank takes `inner_steps` steps of its own optimizer on its own data; then the
             pseudo-gradient (global weights minus local weights) is averaged over ranks and
             applied to the global weights by an outer Nesterov SGD, and every rank continues
             from the new global weights (Douillard et al., "DiLoCo", 2023). It sends one model's
             worth of bytes per `inner_steps` steps instead of one per step.
    ShardedDiLoCo  DiLoCo between groups of `shard_group` ranks, each group training FSDP2-sharded
             (fast links inside a group); each rank averages its own shard's pseudo-gradient with
             the ranks holding that shard in the other groups (1/N of a model per rank per sync).
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

import contextlib
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from keel.config import DistributedConfig
from keel.distributed.comm import Comm, count_fsdp
from keel.distributed.world import init_world
from keel.errors import KeelError

# How a metrics row is combined over ranks; every rank sends the same vector, marking what it
# lacks. Keys not listed (step, lr, stage, ...) are the same on every rank and kept as they are.
SUM = ("sampled", "groups", "tokens", "tokens_per_s")
MEAN = ("loss", "reward", "reward_correct", "reward_format", "accuracy", "response_length", "truncated",
        "clip_frac", "kl", "entropy", "grad_norm", "step_s", "rollout_s", "rows_skipped",
        "mismatch_kl", "mismatch_k3", "correction_share", "ess", "weight_sync_s")  # another rollout backend
REDUCED = SUM + MEAN
MAX = ("peak_rss_mb", "peak_device_mb")  # memory: the busiest rank's, what each machine must hold


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def local(p: torch.Tensor) -> torch.Tensor:
    """The part of parameter `p` this rank holds, without autograd: all of it, or its FSDP shard
    (a view: writing into it writes the shard)."""
    return p.to_local().detach() if isinstance(p, DTensor) else p.detach()


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
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.world.size > 1:  # every rank starts from rank 0's weights
            with torch.no_grad():
                vec = self.comm.broadcast(flat([p.detach() for p in self.params]).to(comm.device), "setup")
                unflat_(vec, self.params)

    def grads(self) -> None:
        """Between backward and the optimizer step."""

    def run(self, fn, last: bool = True):
        """`fn(model)`: a training forward, whose backward follows before the next `run`. `last`:
        the step's last pass, after whose backward the ranks' gradients must be averaged."""
        return fn(self.model)

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
            peaks = [key for key in MAX if key in row]
            if peaks:
                most = torch.tensor([float(row[k]) for k in peaks], dtype=torch.float64, device=self.comm.device)
                row.update(zip(peaks, self.comm.all_reduce(most, "metrics", op=dist.ReduceOp.MAX).tolist()))
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

    def check_resume(self, meta: dict) -> None:
        """KeelError unless this run can resume a checkpoint whose sync meta (`state`'s) is `meta`:
        one of DiLoCo over FSDP only in its own layout (`same_layout`)."""
        same_layout(meta, {})

    def checkpoint_shards(self, shards: dict) -> dict:
        """How the parts each rank writes through DCP (a sharded checkpoint) are keyed there: as
        they are, the same model on every rank."""
        return shards


class DataParallel(Sync):
    """The loss weighting of DDP and FSDP: the ranks' gradients are averaged, so rank r's loss
    weighs `n_r * ranks / n_total` to give the gradient of the mean over every rank's units."""

    def any(self, flag: bool) -> bool:
        return flag if self.world.size == 1 else self.comm.scalar(float(flag), "control") > 0

    def share(self, n: float) -> float:
        if self.world.size == 1:
            return 1.0
        total = self.comm.scalar(n, "control")
        return n * self.world.size / total if total else 0.0


class Closure(torch.nn.Module):
    """A module whose forward is any function of the model: DDP's forward then covers however
    a trainer calls the model (its top-level forward, or the decoder and the LM head apart)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def mean_bucket(comm, bucket):  # unannotated: DDP checks the annotations, which this module keeps as strings
    """DDP's comm hook: a bucket of gradients (dist.GradBucket) summed over the ranks through
    keel's counted collective, then divided by their number, as keel's all-reduce always did."""
    return comm.all_reduce_async(bucket.buffer(), "grads").then(lambda fut: fut.value()[0].div_(comm.world.size))


class DDP(DataParallel):
    """torch's DistributedDataParallel: gradients all-reduced in buckets while the backward runs,
    through keel's byte accounting and link simulation (`mean_bucket`). Only the last pass of a
    step synchronises (`run(..., last=True)`); the others accumulate locally (`no_sync`), so ranks
    with different numbers of micro-batches still pair up, one all-reduce per step each. Every
    trained parameter must take part in each step's loss (DDP's find_unused_parameters stays off):
    a rank without data runs a forward and backward of zero weight (the RL trainer's stand-in passes).
    Measured on tests/distributed/worker.py: every rank's weights after SFT, RL, micro-batched GRPO
    and DAPO steps bit-identical to keel's former one-bucket all-reduce, and the same byte counts."""

    def __init__(self, model: torch.nn.Module, comm: Comm):
        super().__init__(model, comm)
        self.ddp = None
        if self.world.size > 1:  # keel's broadcast has already given every rank rank 0's weights
            self.ddp = DistributedDataParallel(Closure(model), init_sync=False, forward_sync_buffers=False)
            self.ddp.register_comm_hook(self.comm, mean_bucket)

    def run(self, fn, last: bool = True):
        if self.ddp is None:
            return fn(self.model)
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            return self.ddp(fn)


class DiLoCo(Sync):
    rank_local = ("rng", "data", "model", "optimizer")  # between syncs each rank has its own

    def __init__(self, model: torch.nn.Module, comm: Comm, cfg: DistributedConfig):
        super().__init__(model, comm)
        self.outer_setup(cfg, comm)

    def outer_setup(self, cfg: DistributedConfig, across: Comm) -> None:
        """The global weights (this rank's part of them) and their outer optimizer; `across`: the
        ranks whose pseudo-gradients are averaged with this rank's."""
        self.cfg, self.across = cfg, across
        with torch.no_grad():
            self.global_params = [local(p).clone() for p in self.params]
        m = cfg.outer_momentum
        self.outer = torch.optim.SGD(self.global_params, lr=cfg.outer_lr, momentum=m, nesterov=m > 0)
        if m:  # zeros make SGD's first step its own (buf = 0 * m + pseudo-gradient), and the checkpoints
            #    hold the same tensors before the first sync as after it
            for g in self.global_params:
                self.outer.state[g]["momentum_buffer"] = torch.zeros_like(g)

    def after_step(self, step: int, final: bool) -> None:
        if step % self.cfg.inner_steps and not final:
            return
        with torch.no_grad():
            pseudo = flat([g - local(p) for g, p in zip(self.global_params, self.params)])
            mean = self.average(pseudo)
            for g in self.global_params:
                g.grad = torch.empty_like(g)
            unflat_(mean, [g.grad for g in self.global_params])
        self.outer.step()
        with torch.no_grad():
            for p, g in zip(self.params, self.global_params):
                local(p).copy_(g)

    def average(self, vec: torch.Tensor) -> torch.Tensor:
        """The mean of every `across` rank's `vec`, sent as fp32, bf16 or int8 with one scale per
        tensor. Compressed payloads are all-gathered and summed in fp32 on every rank (a
        low-precision sum would round at every hop); every rank decodes the same bytes, its own
        included, so the ranks' global weights stay identical."""
        comm = self.across
        n, kind = comm.world.size, self.cfg.compress
        if kind == "none":
            return comm.all_reduce(vec.to(comm.device), "pseudo_grads").to(vec.device) / n
        if kind == "bf16":
            parts = comm.all_gather(vec.to(comm.device, torch.bfloat16), "pseudo_grads")
            return torch.stack([p.float() for p in parts]).mean(0).to(vec.device)
        sizes = [g.numel() for g in self.global_params]
        # An FSDP shard may be empty (a dimension smaller than the group): its scale is unused.
        scales = torch.stack([c.abs().max() if c.numel() else c.new_zeros(()) for c in vec.split(sizes)])
        scales = scales.clamp(min=1e-30) / 127
        q = torch.cat([(c / s).round().to(torch.int8) for c, s in zip(vec.split(sizes), scales)])
        qs = comm.all_gather(q.to(comm.device), "pseudo_grads")
        ss = comm.all_gather(scales.float().to(comm.device), "pseudo_grads")
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
                g.copy_(local(tensors[f"global.{i}"]))
                if f"momentum.{i}" in tensors:  # checkpoints written before the zeros have none before the first sync
                    self.outer.state[g]["momentum_buffer"].copy_(local(tensors[f"momentum.{i}"]))


class ShardedDiLoCo(DiLoCo):
    """DiLoCo whose workers are groups of `shard_group` consecutive ranks (fast links inside a
    node), each group training FSDP2-sharded over its own ranks (the HSDP-like layout of
    INTELLECT-1). Inner steps: every rank holds 1/N of its group's weights, gradients and AdamW
    state; FSDP gathers and reduce-scatters within the group only. Outer step: each rank averages
    its own shard's pseudo-gradient with the ranks holding the same shard in the other groups, so
    the slow links carry 1/N of a model per rank per sync. The loss weights are FSDP's within the
    group (`share`): a group minimises the mean over its ranks' units, as a DiLoCo rank minimises
    its batch's. `frozen` copies (RL's KL reference) are sharded over the group as the model is.

    Checkpoints go through DCP as under fsdp, each rank writing its own shards: its group's model
    and optimizer under `group<g>` (the groups' differ between syncs, `checkpoint_shards`), the
    global weights and outer momentum as DTensors placed as their parameters (the same in every
    group: DCP writes each shard once). They resume onto the same ranks and shard_group only."""
    rank_local = Sync.rank_local  # the model and optimizer are shards, written by DCP per group

    def __init__(self, model: torch.nn.Module, comm: Comm, cfg: DistributedConfig, device: torch.device,
                 frozen: tuple[torch.nn.Module, ...] = ()):
        super(DiLoCo, self).__init__(model, comm)  # Sync: every rank starts from rank 0's full weights
        copy_weights(model, frozen)
        self.model, n = model, cfg.shard_group
        if self.world.size % n:
            raise KeelError(f"distributed: shard_group ({n}) must divide the number of ranks ({self.world.size})",
                            field="distributed.shard_group")
        mesh = init_device_mesh(device.type, (self.world.size // n, n), mesh_dim_names=("replicate", "shard"))
        for module in (model, *frozen):
            shard_layers(module, device, mesh["shard"])
        self.params = [p for p in model.parameters() if p.requires_grad]  # now DTensors over the group
        self.group = comm.sub(mesh.get_group("shard"))
        self.replica = mesh.get_local_rank("replicate")  # this rank's group
        self.outer_setup(cfg, comm.sub(mesh.get_group("replicate")))

    def any(self, flag: bool) -> bool:
        """Within the group, whose ranks' passes are FSDP's collectives."""
        return self.group.scalar(float(flag), "control") > 0

    def share(self, n: float) -> float:
        total = self.group.scalar(n, "control")
        return n * self.group.world.size / total if total else 0.0

    def passes(self, n: int) -> int:
        """FSDP's collectives pair up within the group: as many passes as its busiest rank."""
        return int(self.group.scalar(n, "control", op=dist.ReduceOp.MAX))

    def layout(self) -> dict:
        """What a checkpoint of this run is resumed onto (`same_layout`)."""
        return {"shard_group": self.group.world.size, "world_size": self.world.size}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's shards of the global weights and momentum, as views (DCP loads into them)."""
        tensors, _ = super().state()
        return {key: as_placed(t, self.params[int(key.partition(".")[2])]) for key, t in tensors.items()}, self.layout()

    def check_resume(self, meta: dict) -> None:
        same_layout(meta, self.layout())

    def checkpoint_shards(self, shards: dict) -> dict:
        own = {part: shards[part] for part in ("model", "optimizer") if part in shards}
        return {f"group{self.replica}": own, **{part: t for part, t in shards.items() if part not in own}}


def as_placed(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`t`, this rank's part of a tensor shaped as `param`, as a DTensor sharded as `param` is
    (sharing `t`'s memory); `t` itself where `param` is a plain tensor."""
    if not isinstance(param, DTensor):
        return t
    return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def same_layout(saved: dict, mine: dict) -> None:
    """KeelError unless a checkpoint's DiLoCo-over-FSDP layout `saved` ({"shard_group", "world_size"},
    or {} from any other sync) is this run's (`mine`, likewise): DCP maps shards onto other ranks,
    not one group's model onto another group."""
    keys = ("shard_group", "world_size")
    was, now = ({k: d[k] for k in keys if k in d} for d in (saved, mine))
    if was != now:
        wrote, runs = (f"DiLoCo over FSDP (shard_group {d['shard_group']}, {d['world_size']} ranks)" if d
                       else "another sync than DiLoCo over FSDP" for d in (was, now))
        raise KeelError(f"the checkpoint was written by {wrote} and this run is {runs}: resume with the "
                        "distributed settings and number of ranks that wrote it, or start a fresh run",
                        field="distributed.shard_group")


def shard_layers(model: torch.nn.Module, device: torch.device, mesh=None, offload: bool = False) -> None:
    """FSDP2 on each decoder layer, then the root, over `mesh` (default: every rank). On
    accelerators bf16 weights for the compute and fp32 gradient reduction, the sharded fp32
    parameters staying the optimizer's master copy; on CPU fp32 throughout (exactness tests).
    `offload`: the shards (and their gradients and optimizer state) live in host memory and are
    copied to the device for each use (CPUOffloadPolicy); on a CPU run they are there already.
    Pinned host memory needs an accelerator, so it is pinned only with one."""
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type != "cpu" else MixedPrecisionPolicy())
    policy = CPUOffloadPolicy(pin_memory=device.type != "cpu") if offload else OffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=policy)


class FSDP(DataParallel):
    """FSDP2 over the ranks; with one process, nothing to shard (the plain model, as DDP).

    The loss weights are DDP's (`share`): FSDP's reduce-scatter divides the sum of the ranks'
    gradients by the world size, as DDP's all-reduce does, so rank r's loss times
    `n_r * ranks / n_total` gives the gradient of the mean over every rank's units. FSDP's own
    collectives are counted into `comm_bytes` as "fsdp" (`comm.count_fsdp`).
    Every forward and backward of a sharded module is a collective: each rank must run as many,
    in the same order (`passes`), and nothing may run one on a single rank (sampling, evaluation:
    the RL trainer keeps a plain copy for them, fed `full_state`). The chunked LM head runs the
    decoder and the head outside the root's `forward`, as a forward method registered with FSDP
    (engine/head.head_logprobs), so the root's weights are gathered for it all the same.
    The trainers build their optimizer after this (over the sharded DTensor parameters), and
    keel.resilience.state turns the sharded model and optimizer into checkpoints."""

    def __init__(self, model: torch.nn.Module, comm: Comm, device: torch.device, offload: bool = False,
                 frozen: tuple[torch.nn.Module, ...] = ()):
        super().__init__(model, comm)  # every rank starts from rank 0's (full) weights
        copy_weights(model, frozen)
        self.model = model
        if self.world.size == 1:
            return
        for module in (model, *frozen):
            shard_layers(module, device, offload=offload)
            count_fsdp(module, comm)  # FSDP's own collectives into comm_bytes, as "fsdp"
        self.params = [p for p in model.parameters() if p.requires_grad]  # now DTensors

    def grads(self) -> None:
        """FSDP has reduce-scattered the gradients during the backward."""

    def passes(self, n: int) -> int:
        if self.world.size == 1:
            return n
        return int(self.comm.scalar(n, "control", op=dist.ReduceOp.MAX))


def copy_weights(model: torch.nn.Module, frozen: tuple[torch.nn.Module, ...]) -> None:
    """Give each of `frozen` (copies of `model` that never train) `model`'s weights: rank 0's, once
    the synchroniser has broadcast them."""
    for module in frozen:
        module.load_state_dict(model.state_dict())


def full_state(model: torch.nn.Module, main_only: bool = False) -> dict[str, torch.Tensor]:
    """`model`'s full weights by name (its `state_dict()` keys): a sharded model's gathered from
    every rank's shards (a collective: every rank calls it, in the same order), on every rank, or
    with `main_only` on rank 0 alone, in host memory (the others get an empty dict); a plain
    model's own tensors."""
    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=main_only))


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


def make_sync(cfg: DistributedConfig, model: torch.nn.Module, device: torch.device,
              frozen: tuple[torch.nn.Module, ...] = ()) -> Sync:
    """Join the process group (under torchrun) and return the configured synchroniser. Build the
    optimizer after this: under fsdp it must hold the sharded parameters. `frozen`: copies of
    `model` that never train (RL's KL reference), taken before this call; they get the weights
    `model` starts from and, under fsdp, are sharded as it is (their forwards are collectives too)."""
    world = init_world(device)
    comm = Comm(world, device, cfg.link_gbps, cfg.link_latency_ms)
    if cfg.sync == "diloco" and cfg.shard_group > 1 and world.size > 1:
        return ShardedDiLoCo(model, comm, cfg, device, frozen)
    if cfg.sync == "fsdp":
        return FSDP(model, comm, device, cfg.offload, frozen)
    sync = DiLoCo(model, comm, cfg) if cfg.sync == "diloco" else DDP(model, comm)
    copy_weights(model, frozen)
    return sync
