"""Shared timing helpers for the benchmarks."""
import statistics
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
