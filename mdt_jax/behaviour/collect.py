"""Batched dataset collection on the native executor, in the D4RL layout.

Episodes run in waves of `num_envs` environment slots stepped together in MuJoCo C; each slot runs
episodes back to back until it has at least `slot_steps` steps (`run_wave`). Wave w draws everything from
`default_rng([seed, w])`, so waves are independent of one another: `collect` can keep finished
waves in a folder (`wave_dir`) and, killed and run again, resume from the last complete wave with
the same result as an uninterrupted run. Each episode is stored contiguously, with `terminals`
on its last step if it terminated and `timeouts` if it was truncated; the dataset stops at
exactly `transitions` steps, its last episode possibly cut short.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from mdt_jax import envs
from mdt_jax.data import OfflineDataset
from mdt_jax.fileio import NPZ, Store
from mdt_jax.envs.rollout import FIELDS  # the D4RL arrays, in the order `envs.run_episodes` records them

Policy = envs.Policy
SLOT_STEPS = 4000  # per slot and wave: the steps lost while a wave's last episodes end are < 1/4 of it


def uniform_policy(act_dim: int) -> Policy:
    """Uniform random actions in [-1, 1] (D4RL's 'random' quality)."""
    return lambda obs, rng: rng.uniform(-1.0, 1.0, (obs.shape[0], act_dim))


def run_wave(env: envs.NativeBatchEnv, policy: Policy, rng: np.random.Generator, slot_steps: int = 1000) -> list[dict]:
    """One wave: each of the env's N slots runs episodes back to back (a finished one is reset at
    once, `reset_where`) until it holds `slot_steps` steps, then finishes the episode it is in; the
    wave ends when every slot is done. Returns the episodes slot by slot, in order.

    So the batch stays full however short the episodes are (falling random hoppers last ~20
    steps); the steps a finished slot takes while the others end are dropped. The loop is
    `envs.run_episodes` with `slot_steps`; actions are clipped to [-1, 1] (and stored so).
    """
    clipped = lambda obs, rng: np.clip(np.asarray(policy(obs, rng), np.float64), -1.0, 1.0)
    return envs.run_episodes(env, clipped, rng=rng, slot_steps=slot_steps, record=True).episodes()


def _wave_episodes(arrays: dict) -> list[dict]:
    return [{k: arrays[f"{i}_{k}"] for k in FIELDS} for i in range(int(arrays["n"]))]


def _wave_arrays(episodes: list[dict]) -> dict:
    return {f"{i}_{k}": ep[k] for i, ep in enumerate(episodes) for k in FIELDS} | {"n": np.asarray(len(episodes))}


def collect(task: str, policy: Policy, transitions: int, *, num_envs: int = 64, seed: int = 0,
            progress: Callable[[int], None] | None = None, metadata: dict | None = None,
            wave_dir: str | None = None, slot_steps: int = SLOT_STEPS) -> OfflineDataset:
    """Roll `policy(obs, rng) -> actions` out until `transitions` steps are gathered, in waves of
    `num_envs` slots x at least `slot_steps` steps (fewer when the request is smaller).

    With `wave_dir`, each finished wave is saved there (atomically) and reused on a rerun.
    """
    t = envs.get_task(task)
    if not isinstance(transitions, int) or transitions <= 0:
        raise ValueError(f"transitions must be a positive int, got {transitions!r}")
    if not isinstance(num_envs, int) or num_envs <= 0:
        raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
    env = envs.NativeBatchEnv(t, num_envs)
    waves = Store(wave_dir, NPZ, what="collection wave") if wave_dir else None
    if not isinstance(slot_steps, int) or slot_steps <= 0:
        raise ValueError(f"slot_steps must be a positive int, got {slot_steps!r}")
    slot_steps = min(slot_steps, -(-transitions // num_envs))  # small requests: one short wave
    episodes: list[dict] = []
    have, wave = 0, 0
    while have < transitions:
        run = lambda: run_wave(env, policy, np.random.default_rng([seed, wave]), slot_steps)
        eps = _wave_episodes(waves.cached(f"wave_{slot_steps}_{wave:06d}", lambda: _wave_arrays(run()))) if waves \
            else run()
        for ep in eps:
            if have >= transitions:
                break
            episodes.append(ep)
            if progress is not None:
                progress(min(len(ep["rewards"]), transitions - have))
            have += len(ep["rewards"])
        wave += 1
    returns = [float(ep["rewards"].sum()) for ep in episodes]
    data = {k: np.concatenate([ep[k] for ep in episodes])[:transitions] for k in FIELDS}
    meta = {"task": t.name, "seed": seed, "transitions": transitions, "num_envs": num_envs, "slot_steps": slot_steps,
            "episodes": len(returns),
            "return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
            "return_max": float(np.max(returns))} | (metadata or {})
    return OfflineDataset(**data, metadata=meta)
