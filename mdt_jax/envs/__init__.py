"""Locomotion tasks (Gymnasium v5 semantics) on two executors: native MuJoCo C and MJX.

`make(task, executor, num_envs)` returns either a `NativeBatchEnv` (stateful, NumPy, for CPU) or
a Brax env over MJX (functional, jittable, for accelerators). The mjx module (and brax) is
imported only when asked for. `run_episodes` (envs/rollout.py) is the one loop that runs a batch
of episodes of a host policy on the native executor.
"""
from __future__ import annotations

import jax

from mdt_jax.envs.native import NativeBatchEnv
from mdt_jax.envs.rollout import EpisodePolicy, Policy, Rollout, run_episodes
from mdt_jax.envs.tasks import (TASKS, Task, get_task, is_healthy, normalized_score, observe, transition,
                                v5_normalized_score, v5_reference)

EXECUTORS = ("auto", "native", "mjx")


def target_return(task: str | Task) -> float:
    """The paper's evaluation return-to-go target (hopper 3600, halfcheetah 12000, walker2d 5000)."""
    return get_task(task).target_return


def resolve_executor(executor: str = "auto") -> str:
    """'auto' is mjx on a GPU/TPU default backend and native on CPU; others pass through."""
    if executor not in EXECUTORS:
        raise ValueError(f"Unknown executor {executor!r}; choose one of {EXECUTORS}")
    if executor == "auto":
        return "mjx" if jax.default_backend() in ("gpu", "tpu") else "native"
    return executor


def make(task: str | Task, executor: str = "auto", num_envs: int = 1, **options):
    """Builds `num_envs` envs of `task` on an executor.

    Args:
      task: a name in TASKS or a Task.
      executor: "native", "mjx" or "auto" (see `resolve_executor`).
      num_envs: batch size.
      **options: passed to the executor: `nthread` for native; `iterations`, `ls_iterations`
        for mjx.

    Returns:
      native: `NativeBatchEnv(task, num_envs)`. mjx: `MjxEnv` wrapped in Brax's `VmapWrapper`, so
      `reset(rng)` gives a State with leading axis num_envs and `step` takes (num_envs, act_dim).
    """
    task = get_task(task)
    if resolve_executor(executor) == "native":
        return NativeBatchEnv(task, num_envs, **options)
    from brax.envs.wrappers.training import VmapWrapper
    from mdt_jax.envs.mjx import MjxEnv
    return VmapWrapper(MjxEnv(task, **options), batch_size=num_envs)


__all__ = ["EXECUTORS", "TASKS", "EpisodePolicy", "Policy", "Rollout", "Task", "NativeBatchEnv", "get_task", "is_healthy",
           "make", "normalized_score", "observe", "resolve_executor", "run_episodes", "target_return", "transition",
           "v5_normalized_score", "v5_reference"]
