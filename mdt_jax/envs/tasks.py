"""Locomotion tasks with Gymnasium v5 semantics, shared by the native and mjx executors.

A `Task` holds everything that defines Hopper-v5, HalfCheetah-v5 and Walker2d-v5 at their
default arguments: the MJCF (Gymnasium's own asset), frame skip, observation, reward terms,
health and termination rules, reset noise and the 1000-step time limit. `observe` and
`transition` turn MuJoCo state into what an agent sees; they take the array module (`numpy` or
`jax.numpy`) as `xp` and broadcast over leading batch axes, so both executors run this one copy.

Facts taken from gymnasium/envs/mujoco/{hopper,walker2d,half_cheetah}_v5.py (gymnasium 1.4):
- observation = qpos[1:] (x position excluded) ++ qvel, qvel clipped to [-10, 10] for hopper and
    walker2d only;
- reward = forward_reward_weight * (x_after - x_before) / dt + healthy_reward * is_healthy
    - ctrl_cost_weight * sum(action**2), x being qpos[0] (the torso's slide joint) before and after
    the frame-skipped step, dt = timestep * frame_skip, the cost taken on the action as given
    (MuJoCo clamps ctrl to ctrlrange internally, Gymnasium does not clip);
- healthy: strict inequalities lo < v < hi on z = qpos[1] and angle = qpos[2]; the hopper also
    requires every element of (qpos[2:], unclipped qvel) inside (-100, 100); v5 pays
    healthy_reward only while healthy; halfcheetah has no health rule and never terminates;
- reset: qpos = qpos0 + U(-s, s); qvel = U(-s, s), except halfcheetah's qvel = s * N(0, 1);
- TimeLimit wrapper: truncated once 1000 steps have been taken (independently of terminated).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
from typing import Any

import mujoco
import numpy as np

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class Task:
    """One locomotion task: MJCF, frame skip, obs/reward/termination rules, reference returns."""

    name: str
    xml: str  # file name in gymnasium/envs/mujoco/assets
    frame_skip: int
    obs_dim: int
    act_dim: int
    ctrl_cost_weight: float
    reset_noise_scale: float
    qvel_noise: str  # "uniform" or "normal"
    random_score: float  # D4RL REF_MIN_SCORE (d4rl/infos.py), the "random" return
    expert_score: float  # D4RL REF_MAX_SCORE (d4rl/infos.py), the "expert" return
    target_return: float  # the paper's evaluation return-to-go target
    forward_reward_weight: float = 1.0
    healthy_reward: float = 0.0
    terminate_when_unhealthy: bool = False
    healthy_z_range: Range | None = None  # None: no health rule at all
    healthy_angle_range: Range | None = None
    healthy_state_range: Range | None = None  # bounds on (qpos[2:], qvel); hopper only
    qvel_clip: float | None = None  # observation clips qvel to [-clip, clip]
    max_episode_steps: int = 1000

    @property
    def xml_path(self) -> str:
        """Path of the MJCF inside the installed gymnasium package."""
        return str(importlib.resources.files("gymnasium") / "envs" / "mujoco" / "assets" / self.xml)

    def load_model(self) -> mujoco.MjModel:
        """Compiles the task's MJCF with MuJoCo."""
        return mujoco.MjModel.from_xml_path(self.xml_path)


_LEGGED = dict(
        frame_skip=4, ctrl_cost_weight=1e-3, reset_noise_scale=5e-3, qvel_noise="uniform",
        healthy_reward=1.0, terminate_when_unhealthy=True, qvel_clip=10.0)

TASKS: dict[str, Task] = {
        "hopper": Task(
                "hopper", "hopper.xml", obs_dim=11, act_dim=3,
                random_score=-20.272305, expert_score=3234.3, target_return=3600.0,
                healthy_z_range=(0.7, math.inf), healthy_angle_range=(-0.2, 0.2),
                healthy_state_range=(-100.0, 100.0), **_LEGGED),
        "walker2d": Task(
                "walker2d", "walker2d_v5.xml", obs_dim=17, act_dim=6,
                random_score=1.629008, expert_score=4592.3, target_return=5000.0,
                healthy_z_range=(0.8, 2.0), healthy_angle_range=(-1.0, 1.0), **_LEGGED),
        "halfcheetah": Task(
                "halfcheetah", "half_cheetah.xml", frame_skip=5, obs_dim=17, act_dim=6,
                ctrl_cost_weight=0.1, reset_noise_scale=0.1, qvel_noise="normal",
                random_score=-280.178953, expert_score=12135.0, target_return=12000.0),
}


def get_task(task: str | Task) -> Task:
    """Returns the Task for a name (or the Task itself); ValueError lists the known names."""
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task]


def normalized_score(task: str | Task, returns):
    """D4RL-referenced, gym v2 returns: 100 * (R - random) / (expert - random).

    The references are D4RL's REF_MIN_SCORE / REF_MAX_SCORE for the *-v2 datasets (d4rl/infos.py),
    measured on gym v2 envs with mujoco-py, not on our Gymnasium v5 tasks; `v5_normalized_score`
    uses references measured on ours. Works on floats, NumPy and JAX arrays alike.
    """
    t = get_task(task)
    return 100.0 * (returns - t.random_score) / (t.expert_score - t.random_score)


V5_REFERENCE_FILE = "v5_reference.json"


@functools.lru_cache(maxsize=None)
def _v5_table() -> dict:
    import json

    path = importlib.resources.files("mdt_jax.envs") / V5_REFERENCE_FILE
    with path.open() as f:
        doc = json.load(f)
    if doc.get("format") != "mdt_jax.v5_reference" or doc.get("format_version") != 1:
        raise ValueError(f"{path}: not an mdt_jax v5 reference table (format {doc.get('format')!r}, "
                         f"version {doc.get('format_version')!r})")
    return doc


def v5_reference(task: str | Task) -> tuple[float, float]:
    """(random, expert) mean returns on the Gymnasium v5 task, from mdt_jax/envs/v5_reference.json:
    a uniform-random policy and the committed expert behaviour policy (deterministic actions), each
    over >= 100 episodes (`python -m launch.reference_returns`; the file's `command` field)."""
    t = get_task(task)
    tasks = _v5_table()["tasks"]
    if t.name not in tasks:
        raise ValueError(f"no v5 reference returns for {t.name!r} in {V5_REFERENCE_FILE} (has {sorted(tasks)}); "
                         "measure them with launch.reference_returns")
    row = tasks[t.name]
    return float(row["random"]["mean"]), float(row["expert"]["mean"])


def v5_normalized_score(task: str | Task, returns):
    """v5-referenced score 100 * (R - random) / (expert - random), with the random and expert
    returns measured on our Gymnasium v5 task (`v5_reference`), so 0 is the uniform-random policy
    and 100 the committed expert on the same env. Works on floats, NumPy and JAX arrays alike."""
    lo, hi = v5_reference(task)
    return 100.0 * (returns - lo) / (hi - lo)


def observe(task: Task, qpos, qvel, xp: Any = np):
    """Observation from qpos (..., nq) and qvel (..., nv): qpos[1:] then (clipped) qvel."""
    if task.qvel_clip is not None:
        qvel = xp.clip(qvel, -task.qvel_clip, task.qvel_clip)
    return xp.concatenate([qpos[..., 1:], qvel], axis=-1)


def _inside(x, bounds: Range):
    return (bounds[0] < x) & (x < bounds[1])


def is_healthy(task: Task, qpos, qvel, xp: Any = np):
    """Gymnasium's health rule, a bool per leading index; always True for halfcheetah."""
    if task.healthy_z_range is None:
        return xp.ones(qpos.shape[:-1], dtype=bool)
    healthy = _inside(qpos[..., 1], task.healthy_z_range)
    healthy = healthy & _inside(qpos[..., 2], task.healthy_angle_range)
    if task.healthy_state_range is not None:
        state = xp.concatenate([qpos[..., 2:], qvel], axis=-1)
        healthy = healthy & xp.all(_inside(state, task.healthy_state_range), axis=-1)
    return healthy


def transition(task: Task, x_before, qpos, qvel, action, dt: float, xp: Any = np):
    """What a frame-skipped step yields: (obs, reward, terminated, info).

    Args:
        task: the task.
        x_before: (...) torso x position, qpos[..., 0], before the step.
        qpos, qvel: (..., nq), (..., nv) state after the step.
        action: (..., act_dim) the action applied (the one the control cost is charged on).
        dt: seconds per env step, timestep * frame_skip.
        xp: the array module, numpy or jax.numpy.
    """
    healthy = is_healthy(task, qpos, qvel, xp)
    x_velocity = (qpos[..., 0] - x_before) / dt
    forward = task.forward_reward_weight * x_velocity
    survive = task.healthy_reward * healthy
    ctrl_cost = task.ctrl_cost_weight * xp.sum(xp.square(action), axis=-1)
    reward = forward + survive - ctrl_cost
    terminated = ~healthy if task.terminate_when_unhealthy else xp.zeros_like(healthy)
    info = dict(x_position=qpos[..., 0], x_velocity=x_velocity, reward_forward=forward,
                            reward_ctrl=-ctrl_cost, reward_survive=survive)
    return observe(task, qpos, qvel, xp), reward, terminated, info
