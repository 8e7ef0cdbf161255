"""Gymnasium-v5 reference returns: the uniform-random policy and the committed expert, measured.

D4RL's REF_MIN_SCORE / REF_MAX_SCORE (`envs.tasks.Task.random_score` / `expert_score`) were
measured on gym *-v2 envs with mujoco-py; our tasks follow Gymnasium v5 (different healthy
rules, reset handling and XMLs for walker2d), so a D4RL-normalised score of a v5 return mixes two
envs. This module measures the two anchors of a normalised score on our own envs:

- random: uniform actions in [-1, 1] (`behaviour.collect.uniform_policy`, D4RL's "random"
  quality), one `default_rng([seed, 1])` stream for the batch;
- expert: the committed expert behaviour policy (mdt_jax/behaviour/policies/<task>/expert)
  acting deterministically, tanh(mean), as `behaviour.sac.evaluate_policy` and the expert
  selection evaluate it; and, for information only (not a normalisation anchor), the same
  policy sampling its tanh-Gaussian actions, as the medium/expert datasets were collected.

Every policy starts from the evaluator's episode starts for the seed (`evaluate.reset_states`,
so episode e starts where a DT's episode e does under `mdt_jax.evaluate` with that seed), all
episodes stepped together on the native executor (`envs.run_episodes`) until each has
terminated or reached the 1000-step time limit. `envs.tasks.v5_normalized_score` reads the
committed table of these measurements (mdt_jax/envs/v5_reference.json).
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time

import numpy as np

from mdt_jax import envs

FORMAT = "mdt_jax.v5_reference"
FORMAT_VERSION = 1
OUT_FILE = "reference_returns.json"
MIN_EPISODES = 100

Policy = envs.Policy


def rollout_returns(task: str, policy: Policy, episodes: int, seed: int, *, rng_stream: int = 1,
                    max_steps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(returns (E,), lengths (E,)) of `episodes` episodes of `policy(obs, rng)` from the
    evaluator's starts for `seed`; actions drawn with `default_rng([seed, rng_stream])`."""
    from mdt_jax import evaluate as ev

    t = envs.get_task(task)
    out = envs.run_episodes(envs.NativeBatchEnv(t, episodes, nthread=1), policy,
                            rng=np.random.default_rng([seed, rng_stream]), starts=ev.reset_states(t, episodes, seed),
                            max_steps=max_steps)
    return out.returns, out.lengths


def _summary(ret: np.ndarray, length: np.ndarray, seed: int, **extra) -> dict:
    return {"mean": float(ret.mean()), "std": float(ret.std()), "episodes": int(ret.size), "seed": int(seed),
            "length_mean": float(length.mean()), "min": float(ret.min()), "max": float(ret.max())} | extra


def measure(tasks: list[str], *, episodes: int = MIN_EPISODES, seed: int = 0, max_steps: int = 1000,
            log=print) -> dict:
    """{task: {"random": ..., "expert": ..., "expert_stochastic": ...}}, each with the mean,
    std, episodes, seed, mean length, min and max of the returns (see the module docstring)."""
    from mdt_jax.behaviour import policy as pol
    from mdt_jax.behaviour.collect import uniform_policy
    from mdt_jax.behaviour.datasets import behaviour_policy_dir

    if not isinstance(episodes, (int, np.integer)) or episodes < MIN_EPISODES:
        raise ValueError(f"config.episodes: reference returns need >= {MIN_EPISODES} episodes, got {episodes!r}")
    if not isinstance(max_steps, (int, np.integer)) or max_steps <= 0:
        raise ValueError(f"config.max_steps: must be a positive int, got {max_steps!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"config.seed: must be an int >= 0, got {seed!r}")
    out = {}
    for name in tasks:
        t = envs.get_task(name)
        pdir = behaviour_policy_dir(t.name, "expert")
        cfg, params, meta = pol.load_policy(pdir)
        if cfg.task != t.name:
            raise ValueError(f"{pdir}: a policy for {cfg.task!r}, not {t.name!r}")
        rel = os.path.relpath(pdir, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        row = {}
        t0 = time.perf_counter()
        row["random"] = _summary(*rollout_returns(t.name, uniform_policy(t.act_dim), episodes, seed,
                                                  max_steps=max_steps), seed, policy="uniform in [-1, 1]")
        row["expert"] = _summary(*rollout_returns(t.name, pol.numpy_policy(params, True, cfg.std), episodes, seed,
                                                  max_steps=max_steps), seed, policy=rel,
                                 actions="deterministic tanh(mean)", checkpoint=meta.get("selection", {}).get("checkpoint"))
        row["expert_stochastic"] = _summary(*rollout_returns(t.name, pol.numpy_policy(params, False, cfg.std), episodes,
                                                             seed, rng_stream=2, max_steps=max_steps), seed, policy=rel,
                                            actions="tanh-Gaussian samples (how the datasets are collected); "
                                                    "not a normalisation anchor")
        out[t.name] = row
        log(f"{t.name}: random {row['random']['mean']:.1f} ± {row['random']['std']:.1f}, expert "
            f"{row['expert']['mean']:.1f} ± {row['expert']['std']:.1f} (stochastic "
            f"{row['expert_stochastic']['mean']:.1f}), {episodes} episodes each, {time.perf_counter() - t0:.1f} s")
    return out


def write_reference_returns(workdir: str, tasks=(), *, episodes: int = 100, seed: int = 0, max_steps: int = 1000,
                            overwrite: bool = False) -> str:
    """Measure the v5 reference returns of `tasks` (default: all) and write
    WORKDIR/reference_returns.json (refused if it exists, unless `overwrite`); returns a table."""
    from mdt_jax.fileio import write_json_atomic

    tasks = list(tasks) or list(envs.TASKS)
    for t in tasks:
        if t not in envs.TASKS:
            raise ValueError(f"config.tasks: unknown task {t!r}; known: {sorted(envs.TASKS)}")
    path = os.path.join(workdir, OUT_FILE)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite=True to replace it")
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "launch.reference_returns"] + sys.argv[1:])
    t0 = time.perf_counter()
    measured = measure(tasks, episodes=episodes, seed=seed, max_steps=max_steps,
                       log=lambda s: print(s, flush=True))
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "command": command,
           "envs": "Gymnasium v5 semantics (mdt_jax.envs.tasks) on the native MuJoCo C executor",
           "episodes": int(episodes), "seed": int(seed), "max_steps": int(max_steps),
           "normalisation": "v5_normalized_score = 100 * (R - random.mean) / (expert.mean - random.mean)",
           "wall_s": round(time.perf_counter() - t0, 1), "machine": platform.machine(), "tasks": measured}
    write_json_atomic(path, doc, overwrite=bool(overwrite))
    lines = ["| task | random | expert (deterministic) | expert (stochastic) | D4RL random | D4RL expert |",
             "|---|---|---|---|---|---|"]
    for t, row in measured.items():
        task = envs.get_task(t)
        cell = lambda r: f"{r['mean']:.1f} ± {r['std']:.1f}"
        lines.append(f"| {t} | {cell(row['random'])} | {cell(row['expert'])} | {cell(row['expert_stochastic'])} | "
                     f"{task.random_score:.1f} | {task.expert_score:.1f} |")
    return "\n".join(lines) + f"\n\nWritten to {path}"
