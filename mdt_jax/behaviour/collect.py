"""Batched dataset collection on the native executor, in the D4RL layout.

Episodes run in waves of `num_envs` environments stepped together in MuJoCo C; a wave ends when
every episode in it has terminated or hit the time limit. Wave w draws everything from
`default_rng([seed, w])`, so waves are independent of one another: `collect` can keep finished
waves in a folder (`wave_dir`) and, killed and run again, resume from the last complete wave with
the same result as an uninterrupted run. Each episode is stored contiguously, with `terminals`
on its last step if it terminated and `timeouts` if it was truncated; the dataset stops at
exactly `transitions` steps, its last episode possibly cut short.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from mdt_jax import envs
from mdt_jax.data import OfflineDataset

Policy = Callable[[np.ndarray, np.random.Generator], np.ndarray]
FIELDS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")


def uniform_policy(act_dim: int) -> Policy:
    """Uniform random actions in [-1, 1] (D4RL's 'random' quality)."""
    return lambda obs, rng: rng.uniform(-1.0, 1.0, (obs.shape[0], act_dim))


def run_wave(env: envs.NativeBatchEnv, policy: Policy, rng: np.random.Generator) -> list[dict]:
    """One wave: every env from reset to its episode's end; returns the episodes in env order."""
    obs = env.reset(rng)
    done = np.zeros(env.num_envs, bool)
    steps = {k: [] for k in FIELDS + ("live",)}
    while not done.all():
        act = np.clip(np.asarray(policy(obs, rng), np.float64), -1.0, 1.0)
        nxt, r, term, trunc, _ = env.step(act)
        for k, v in zip(steps, (obs, act, r, term, trunc, nxt, ~done)):
            steps[k].append(v)
        done |= term | trunc
        obs = nxt
    arr = {k: np.stack(v, 1) for k, v in steps.items()}  # (N, T, ...)
    lens = arr.pop("live").sum(1)
    return [{k: v[n, :lens[n]] for k, v in arr.items()} for n in range(env.num_envs)]


def _load_wave(path: str) -> list[dict]:
    with np.load(path, allow_pickle=False) as z:
        n = int(z["n"])
        return [{k: z[f"{i}_{k}"] for k in FIELDS} for i in range(n)]


def _save_wave(path: str, episodes: list[dict]) -> None:
    arrays = {f"{i}_{k}": ep[k] for i, ep in enumerate(episodes) for k in FIELDS} | {"n": np.asarray(len(episodes))}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def collect(task: str, policy: Policy, transitions: int, *, num_envs: int = 64, seed: int = 0,
            progress: Callable[[int], None] | None = None, metadata: dict | None = None,
            wave_dir: str | None = None) -> OfflineDataset:
    """Roll `policy(obs, rng) -> actions` out until `transitions` steps are gathered.

    With `wave_dir`, each finished wave is saved there (atomically) and reused on a rerun.
    """
    t = envs.get_task(task)
    if not isinstance(transitions, int) or transitions <= 0:
        raise ValueError(f"transitions must be a positive int, got {transitions!r}")
    if not isinstance(num_envs, int) or num_envs <= 0:
        raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
    env = envs.NativeBatchEnv(t, num_envs)
    if wave_dir:
        os.makedirs(wave_dir, exist_ok=True)
    episodes: list[dict] = []
    have, wave = 0, 0
    while have < transitions:
        path = os.path.join(wave_dir, f"wave_{wave:06d}.npz") if wave_dir else None
        if path and os.path.exists(path):
            eps = _load_wave(path)
        else:
            eps = run_wave(env, policy, np.random.default_rng([seed, wave]))
            if path:
                _save_wave(path, eps)
        for ep in eps:
            if have >= transitions:
                break
            episodes.append(ep)
            have += len(ep["rewards"])
            if progress is not None:
                progress(len(ep["rewards"]))
        wave += 1
    returns = [float(ep["rewards"].sum()) for ep in episodes]
    data = {k: np.concatenate([ep[k] for ep in episodes])[:transitions] for k in FIELDS}
    meta = {"task": t.name, "seed": seed, "transitions": transitions, "num_envs": num_envs, "episodes": len(returns),
            "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "return_max": float(np.max(returns))} | (metadata or {})
    return OfflineDataset(**data, metadata=meta)
