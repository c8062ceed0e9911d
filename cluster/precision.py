"""Precision follows the hardware: `dtype: auto` becomes bf16 where the device computes it natively,
else fp32.

On a CPU without avx512_bf16 or AMX (AVX2-only EPYCs, for one) a bf16 matrix product runs ~57x
slower than fp32, so bf16 there is never the default. The decision is a pure function of the
device's capabilities (tested with made-up ones); the capabilities are read on a node of the
cluster by a small Ray task, not on the driver, which may have neither the GPU nor the CPU the
roles run on.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger("groupflow")


@dataclass(frozen=True)
class Caps:
    """What a device can compute natively."""
    device: str                 # "cpu" or "cuda"
    name: str                   # CPU capability ("AVX2", "AVX512", ...) or the GPU's name
    native_bf16: bool

    @classmethod
    def cpu(cls, capability: str, avx512_bf16: bool, amx: bool) -> "Caps":
        return cls("cpu", capability + (" avx512_bf16" if avx512_bf16 else "") + (" amx" if amx else ""),
                   avx512_bf16 or amx)


def probe_caps(device: str) -> dict:
    """This process's device capabilities (runs inside a Ray task on a node of the cluster)."""
    import torch

    if device == "cuda":
        # Native bf16 only (compute capability >= 8.0: A100, H100, ...). By default
        # is_bf16_supported() also says yes where bf16 is emulated (V100, T4), and slowly.
        return asdict(Caps("cuda", torch.cuda.get_device_name(0),
                           torch.cuda.is_bf16_supported(including_emulation=False)))
    return asdict(Caps.cpu(torch.backends.cpu.get_cpu_capability(), torch.cpu._is_avx512_bf16_supported(),
                           torch.cpu._is_amx_tile_supported()))


def choose_dtype(requested: str, caps: Caps, role: str = "engines") -> tuple[str, str | None]:
    """(dtype to use, a warning or None). `auto`: bf16 where native, except a CPU learner, which stays
    fp32 (chosen by held-out accuracy per minute, `groupflow bench learn`: on a CPU with AMX the bf16
    learner was slower and learned less, 0.375 against 0.460 mean held-out accuracy over two seeds;
    at lr 1e-5 a step moves ~7% of its bf16 weights; README "Precision and speed"). An explicit
    choice wins; bf16 on a device without native bf16 gets a warning that says what it costs."""
    if requested == "auto":
        cpu_learner = caps.device == "cpu" and role == "learner"
        return ("bfloat16" if caps.native_bf16 and not cpu_learner else "float32"), None
    if requested in ("bfloat16", "float16") and caps.device == "cpu" and not caps.native_bf16:
        return requested, (f"{requested} was chosen on a CPU without native bf16 ({caps.name}): its matrix "
                           "products run tens of times slower than float32 here; `auto` would pick float32")
    return requested, None


def resolve_precision(cfg, caps_by_device: dict[str, Caps] | None = None):
    """The config (a train, eval or sft config) with engines.dtype and learner.dtype resolved, as a
    copy; logs the choice.

    `caps_by_device` defaults to a probe on the running Ray cluster, one task per device kind."""
    branches = {role: getattr(cfg, role) for role in ("engines", "learner") if hasattr(cfg, role)}
    if caps_by_device is None:
        caps_by_device = {d: Caps(**_probe(d)) for d in {b.device for b in branches.values()}}
    out = {}
    for role, branch in branches.items():
        caps = caps_by_device[branch.device]
        dtype, warning = choose_dtype(branch.dtype, caps, role)
        if warning:
            log.warning("%s.dtype: %s", role, warning)
        how = "auto: " if branch.dtype == "auto" else ""
        log.info("%s.dtype = %s (%s%s %s)", role, dtype, how, branch.device, caps.name)
        out[role] = branch.model_copy(update={"dtype": dtype})
    return cfg.model_copy(update=out)


def _probe(device: str) -> dict:
    import ray

    task = ray.remote(num_cpus=0, num_gpus=1 if device == "cuda" else 0)(probe_caps)
    return ray.get(task.remote(device), timeout=300)
