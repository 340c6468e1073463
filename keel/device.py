"""Accelerator discovery. The only module that knows device families exist.

`torch.accelerator` (torch >= 2.6) names whatever accelerator this torch build drives: cuda, npu
(Ascend, via torch_npu), xpu, mps. Everything else in keel asks this module instead of calling
`torch.cuda.*`, so the same code runs on any of them and on a plain CPU.

It also decides how keel shares a CPU with other work (`share_cpus`): OpenMP threads that wait
for work sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE), and the thread count is the CPUs
this process may actually use (its affinity mask and cgroup quota), not the host's core count.
Either is left alone where the user set it (OMP_WAIT_POLICY, OMP_NUM_THREADS).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

# OpenMP reads its wait policy once, when torch loads it: this has to run before `import torch`
# (keel.cli imports this module first). Spinning waiters (OpenMP's default for a while after each
# parallel region) burn the cycles a busy machine's other processes need, and a thread that lost
# its core holds up every parallel region of its team; sleeping waiters cost a wake-up of
# microseconds per region instead. On a 2-core machine shared with other work, two DAPO steps took
# 255 s with the defaults against 34 s with one thread (issue 18).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from keel.errors import KeelError  # noqa: E402


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, a container's cpuset), capped by
    a cgroup v2 CPU quota (docker --cpus) where one is set."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def share_cpus() -> int:
    """Use `usable_cpus()` threads for CPU work unless OMP_NUM_THREADS says otherwise (torch reads
    that itself); returns the thread count. The count does not follow the machine's load: a run's
    numbers would then depend on what else was running."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(usable_cpus())
    return torch.get_num_threads()


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> the current accelerator if one is usable, else cpu. Any explicit torch device
    string (cpu, cuda:1, npu, xpu, mps) is checked and returned. Under torchrun an accelerator
    without an index is this process's local one (LOCAL_RANK)."""
    if name == "auto":
        acc = torch.accelerator.current_accelerator(check_available=True)
        return _local(torch.device(acc)) if acc is not None else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise KeelError(f"unknown device {name!r}: use auto, cpu, cuda, npu, xpu or mps", field="device") from e
    if device.type != "cpu":
        acc = torch.accelerator.current_accelerator(check_available=True)
        if acc is None or acc.type != device.type:
            have = acc.type if acc is not None else "none"
            raise KeelError(f"device {name!r} is not available here (accelerator: {have}); use auto or cpu",
                            field="device")
    return _local(device)


def _local(device: torch.device) -> torch.device:
    if device.type == "cpu" or device.index is not None or "LOCAL_RANK" not in os.environ:
        return device
    return torch.device(device.type, int(os.environ["LOCAL_RANK"]))


def comm_backend(device: torch.device) -> str:
    """The torch.distributed backend for this device family: gloo on CPU, nccl on CUDA, hccl on
    Ascend (registered by torch_npu), xccl on XPU; whatever torch knows for the rest."""
    return torch.distributed.Backend.default_device_backend_map.get(device.type, "gloo")


def supports_bf16(device: torch.device) -> bool:
    """bf16 autocast pays off on accelerators with bf16 units. On CPU it is correct but usually
    slower than fp32 without AMX, so keel keeps CPU in fp32 unless asked."""
    if device.type == "cpu":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type in ("npu", "xpu")


def autocast(device: torch.device, dtype: str = "auto"):
    """Mixed-precision context for training/inference forwards. dtype: auto | fp32 | bf16 | fp16."""
    if dtype == "auto":
        dtype = "bf16" if supports_bf16(device) else "fp32"
    if dtype == "fp32":
        return contextlib.nullcontext()
    table = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in table:
        raise KeelError(f"unknown dtype {dtype!r}: use auto, fp32, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=table[dtype])


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator living where sampling happens (multinomial needs them co-located)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, for honest timings."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def accelerator_rng_states() -> list[torch.Tensor]:
    """Every accelerator device's RNG state (empty on a CPU-only machine), for exact resume."""
    acc = torch.accelerator.current_accelerator(check_available=True)
    if acc is None:
        return []
    return list(torch.get_device_module(acc.type).get_rng_state_all())


def set_accelerator_rng_states(states: list[torch.Tensor]) -> None:
    acc = torch.accelerator.current_accelerator(check_available=True)
    if acc is not None and states:
        torch.get_device_module(acc.type).set_rng_state_all(states)
