"""Values pinned across machines.

XLA:CPU compiles for the host's vector ISA (AVX2, AVX-512, ...), so float32 reductions are summed
in other orders on other CPUs and their last bits differ (seen: the pins of tests/test_*_pinned.py,
recorded on one machine, differ from an AVX-512 EPYC's by up to 5e-6 relative). A pinned result is
therefore checked bit for bit on a machine whose `fingerprint` recorded it (`EXACT`: its SHA-256),
and to a tight tolerance against the pre-refactor values everywhere, so a change of math is
caught on any machine and a change of summation order on the recording ones.
"""
from __future__ import annotations

import hashlib
import json
import platform


def fingerprint() -> str:
    """What XLA:CPU's code generation depends on here: the CPU model and vector extensions, and
    the jaxlib version."""
    import jaxlib

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() == "model name" and not model:
                    model = v.strip()
                elif k.strip() == "flags" and not flags:
                    flags = set(v.split())
    except OSError:
        model = platform.processor()
    vec = sorted(x for x in flags if x.startswith(("avx", "fma", "amx")))
    return f"{platform.machine()}|{model}|{','.join(vec)}|jaxlib {jaxlib.__version__}"


def digest(value) -> str:
    """SHA-256 of a JSON-able value (floats written exactly, keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
