"""Shared timing code for the benchmarks: the matmul peak and the keys every `--json` carries."""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp


def matmul_peak(repeats: int = 10, n: int = 2048) -> float:
    """float32 matmul GFLOP/s of a jitted n x n `jnp.dot` on this machine (median)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e9


def memory_bandwidth(repeats: int = 10, mb: int = 64) -> float:
    """GB/s of a jitted elementwise pass `x * 1.5 + 1` over an `mb` MB float32 array (2-D, the
    layout of the step's activations), counting the bytes read and written (median). The input is
    donated, so the pass writes into memory already mapped, as a step's thunks do into XLA's
    reused buffers (a fresh 64 MB output costs page faults: about a tenth of this rate here)."""
    f = jax.jit(lambda x: x * 1.5 + 1.0, donate_argnums=0)
    x = f(jnp.ones((mb * 2 ** 20 // 4 // 512, 512), jnp.float32))
    x.block_until_ready()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        x = f(x)
        x.block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(ts) / 1e9


def chunk_timer(chunk, state, data, steps: int):
    """(run, cold_s) for a train chunk `chunk(state, data, steps) -> (state, metrics)` that donates
    its state: the first call (compilation included) is `cold_s`; `run()` times one more call and
    returns seconds per step."""
    t = time.perf_counter()
    box = {"state": chunk(state, data, steps)[0]}  # compile + warm up (state donated)
    jax.block_until_ready(box["state"])
    cold_s = time.perf_counter() - t

    def run() -> float:
        t = time.perf_counter()
        box["state"], m = chunk(box["state"], data, steps)
        jax.block_until_ready(m)
        return (time.perf_counter() - t) / steps

    return run, cold_s


def traced(fn) -> tuple[float, list]:
    """Run `fn()` once under the XLA profiler: (its wall time in seconds, the events of the XLA CPU
    compute threads as (thread, name, start_ns, duration_ns)). The events are the thunks the
    programs ran (named after their HLO instructions) inside `ThunkExecutor::Execute` spans, on the
    intra-op threads (tf_XLAEigen) and on the client thread (tf_XLAPjRtCpuClient), which runs a
    program's small thunks itself."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t = time.perf_counter()
            fn()
            wall = time.perf_counter() - t
        paths = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb")]
        if not paths:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {d}")
        data = jax.profiler.ProfileData.from_file(paths[0])
    events = [(line.name, e.name, e.start_ns, e.duration_ns) for plane in data.planes for line in plane.lines
              if "XLA" in line.name for e in line.events]
    return wall, events


def busy_s(events: list) -> float:
    """Seconds during which some XLA program was executing: the union, over every compute thread,
    of the `ThunkExecutor::Execute` spans of `traced`'s events (nested and overlapping spans once)."""
    spans = sorted((s, s + d) for _, name, s, d in events if name == "ThunkExecutor::Execute")
    total, end = 0.0, -math.inf
    for s, e in spans:
        if e > end:
            total += e - max(s, end)
            end = e
    return total / 1e9


COMMON_KEYS = ("speedup", "speedup_vs_batched", "floor_fraction", "cold_s", "warm_s")


def _seconds(name: str, x, optional: bool) -> float | None:
    if x is None and optional:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {x!r}")
    return float(x)


def common_keys(*, warm_s: float, cold_s: float, peer_s: float | None = None,
                batched_peer_s: float | None = None, floor_s: float | None = None) -> dict:
    """The keys every benchmark's `--json` has, beside its own, for the same work:

    - `warm_s`: ours, a call after the first (compilation done), seconds;
    - `cold_s`: ours, the first call of the process (compilation included), seconds;
    - `speedup`: `peer_s / warm_s`, the one-at-a-time peer (batch 1, sequential) against our warm time;
    - `speedup_vs_batched`: `batched_peer_s / warm_s`, the peer run batched (None: no batched peer);
    - `floor_fraction`: `floor_s / warm_s`, the analytic FLOP floor at the measured matmul peak as a
      fraction of our warm time (None: no floor counted).

    A missing peer or floor gives None. Raises ValueError on a negative, non-finite or missing time.
    """
    warm = _seconds("warm_s", warm_s, False)
    if warm <= 0:
        raise ValueError(f"warm_s must be > 0, got {warm_s!r}")
    ratio = lambda name, x: None if (v := _seconds(name, x, True)) is None else v / warm
    return {"speedup": ratio("peer_s", peer_s), "speedup_vs_batched": ratio("batched_peer_s", batched_peer_s),
            "floor_fraction": ratio("floor_s", floor_s), "cold_s": _seconds("cold_s", cold_s, False),
            "warm_s": warm}


def common_line(keys: dict) -> str:
    """One printed line of the common keys (None shown as '-')."""
    f = lambda k, fmt, unit="": "-" if keys[k] is None else format(keys[k], fmt) + unit
    return (f"ours cold {f('cold_s', '.2f', ' s')}, warm {f('warm_s', '.2f', ' s')}; speedup {f('speedup', '.2f', 'x')} "
            f"(vs batched peer {f('speedup_vs_batched', '.2f', 'x')}); FLOP floor fraction {f('floor_fraction', '.2f')}")
