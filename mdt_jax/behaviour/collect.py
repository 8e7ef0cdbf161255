"""Batched dataset collection on the native executor, in the D4RL layout.

Episodes run in waves of `num_envs` environments stepped together in MuJoCo C; a wave ends when
every episode in it has terminated or hit the time limit. Each episode is stored contiguously,
with `terminals` on its last step if it terminated and `timeouts` if it was truncated; the
dataset stops at exactly `transitions` steps, its last episode possibly cut short.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mdt_jax import envs
from mdt_jax.data import OfflineDataset

Policy = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def uniform_policy(act_dim: int) -> Policy:
    """Uniform random actions in [-1, 1] (D4RL's 'random' quality)."""
    return lambda obs, rng: rng.uniform(-1.0, 1.0, (obs.shape[0], act_dim))


def collect(task: str, policy: Policy, transitions: int, *, num_envs: int = 64, seed: int = 0,
            progress: Callable[[int], None] | None = None, metadata: dict | None = None) -> OfflineDataset:
    """Roll `policy(obs, rng) -> actions` out until `transitions` steps are gathered."""
    t = envs.get_task(task)
    if not isinstance(transitions, int) or transitions <= 0:
        raise ValueError(f"transitions must be a positive int, got {transitions!r}")
    rng = np.random.default_rng(seed)
    env = envs.NativeBatchEnv(t, num_envs)
    chunks: list[dict] = []
    have = 0
    returns: list[float] = []
    while have < transitions:
        obs = env.reset(rng)
        done = np.zeros(num_envs, bool)
        steps = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                 "next_observations", "live")}
        while not done.all():
            act = np.clip(np.asarray(policy(obs, rng), np.float64), -1.0, 1.0)
            nxt, r, term, trunc, _ = env.step(act)
            for k, v in zip(steps, (obs, act, r, term, trunc, nxt, ~done)):
                steps[k].append(v)
            done |= term | trunc
            obs = nxt
        arr = {k: np.stack(v, 1) for k, v in steps.items()}  # (N, T, ...)
        for n in range(num_envs):
            L = int(arr["live"][n].sum())
            ep = {k: v[n, :L] for k, v in arr.items() if k != "live"}
            returns.append(float(ep["rewards"].sum()))
            chunks.append(ep)
            have += L
            if progress is not None:
                progress(L)
            if have >= transitions:
                break
    data = {k: np.concatenate([c[k] for c in chunks])[:transitions] for k in chunks[0]}
    meta = {"task": t.name, "seed": seed, "transitions": transitions, "episodes": len(returns),
            "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "return_max": float(np.max(returns))} | (metadata or {})
    return OfflineDataset(**data, metadata=meta)
