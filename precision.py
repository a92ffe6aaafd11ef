"""The numbers a model computes in, chosen once per device: bfloat16 where the chip has units for it (a GPU that
supports it; a CPU with AMX or AVX-512 BF16 instructions, where oneDNN runs bf16 convolutions several times faster
than float32), float16 on an older GPU, float32 elsewhere. Weights stay float32; autocast chooses per operation.

    dtype = autocast_dtype(torch.device("cpu"))          # None (float32) or torch.bfloat16
    precision = trainer_precision(None, cuda=False)     # Lightning's: "bf16-mixed" or "32-true"
"""
import functools

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 matrix or dot-product instructions


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 matrix (AMX) or dot-product (AVX-512 BF16) instructions; False where unknown."""
    try:
        with open(cpuinfo) as file:
            flags = next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype a model predicts in under autocast, None for float32. "auto": bfloat16 on a GPU that supports it (the
    range of float32, so logits cannot overflow), float16 on an older one; on a CPU bfloat16 where it has bf16 units
    (cpu_has_bf16_units), else float32 (emulated bf16 is slower than float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16_units() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def trainer_precision(requested: str | None, cuda: bool) -> str:
    """Lightning's precision for a training run: the one asked for, else 16-mixed on a GPU, bf16-mixed on a CPU with
    bf16 units, 32-true on other CPUs."""
    if requested:
        return requested
    return "16-mixed" if cuda else "bf16-mixed" if cpu_has_bf16_units() else "32-true"
