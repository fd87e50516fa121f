"""What the host CPU is and which features it has, read once from ``/proc/cpuinfo``.

The kernels' build (``looplm.kernels.build``), the precision choice (``looplm.precision``) and
every benchmark ask here, so one reading of the CPU decides the fast paths and is printed beside
their figures.  Nothing here imports the rest of looplm.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# The flags that decide looplm's speed paths (vector width, bf16/int8 dot products, AMX), printed
# beside every benchmark figure.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
                  "amx_tile", "asimd", "sve")


def _cpuinfo() -> dict[str, str]:
    """The first CPU's ``/proc/cpuinfo`` fields ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where /proc/cpuinfo is absent."""
    fields = _cpuinfo()
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def reported_flags() -> list[str]:
    """Which of ``REPORTED_FLAGS`` this CPU has, in that order."""
    flags = cpu_flags()
    return [flag for flag in REPORTED_FLAGS if flag in flags]


def cpu_name() -> str:
    """The CPU's model name and x86 family/model numbers (which tell, e.g., Zen 1 from Zen 2+,
    whose fp32 FMA units are twice as wide), else what ``platform`` knows."""
    fields = _cpuinfo()
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
