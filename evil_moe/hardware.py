"""What this machine computes fast: asked once, before a run starts.

bfloat16 autocast is the presets' main CPU speed-up, but only where the CPU has
bfloat16 matrix instructions (AVX512-BF16 or AMX on x86, the BF16 extension on
Arm). Elsewhere oneDNN emulates them: measured on a 2-core AVX2-only AMD EPYC, a
1024 x 1024 matmul ran at 0.9 GFLOP/s in bfloat16 against 73 in float32, so a
preset sized for a bf16 machine would take days. ``RunConfig.bf16_autocast:
auto`` asks :func:`native_bf16`, and the pipeline prints the answer and why.
"""

from __future__ import annotations

from pathlib import Path

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""/proc/cpuinfo flags (x86) or features (Arm) that mean native bfloat16 matmuls."""
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The CPU's flags (x86 ``flags``, Arm ``Features``), or None where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def uses_cuda(device: str) -> bool:
    """Whether a run with ``RunConfig.device`` ``device`` runs on a CUDA device ('cuda', or
    'auto' where torch sees one); ``grpo.use_cpu`` is its negation."""
    import torch
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def native_bf16(device: str = "auto", cpuinfo: Path = CPUINFO) -> tuple[bool, str]:
    """``(fast, why)``: whether bfloat16 matmuls are native on the run's device, and a
    clause saying what was found (printed by the pipeline)."""
    if uses_cuda(device):
        import torch
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        return ok, f"{name} {'supports' if ok else 'does not support'} bfloat16"
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return False, f"cannot read the CPU's flags ({cpuinfo}), so bfloat16 is not assumed"
    found = sorted(set(CPU_BF16_FLAGS) & flags)
    if found:
        return True, f"this CPU has {', '.join(found)}"
    simd = "AVX2" if "avx2" in flags else "no AVX2"
    return False, (f"this CPU has no native bfloat16 matmul ({simd}, none of "
                   f"{', '.join(CPU_BF16_FLAGS)}); emulated bfloat16 is ~80x slower than "
                   f"float32 there")


def precision_line(cfg) -> str:
    """One line for the start of a run: the precision it uses and why, with a warning
    when bf16 autocast is on where it is emulated."""
    fast, why = native_bf16(cfg.device)
    state = "on" if cfg.bf16_autocast else "off"
    line = f"precision: {cfg.dtype} weights, bf16 autocast {state} ({why})"
    if cfg.bf16_autocast and not fast:
        line += ("; warning: expect this run to be many times slower than its preset's "
                 "measured time; set bf16_autocast: auto")
    elif not fast and not uses_cuda(cfg.device):
        line += ("; a preset whose time was measured with bf16 autocast takes several "
                 "times longer here")
    return line
