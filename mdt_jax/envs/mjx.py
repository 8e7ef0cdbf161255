"""MuJoCo-XLA executor behind the Brax env API: `reset(rng) -> State`, `step(state, a) -> State`.

Both are pure, jittable and vmappable, so a whole episode (policy included) is one `lax.scan`.
The physics state `State.pipeline_state` is an `mjx.Data`; observation, reward and termination
come from the same `tasks.transition` as the native executor, run with `jax.numpy`.

The model keeps the MJCF's solver options (Newton, 100 iterations, 50 line-search iterations,
tolerance 1e-8), as MuJoCo C uses them, so trajectories track Gymnasium's up to float32 round-off
(see tests/test_envs.py for the measured deviation). Lowering `iterations` / `ls_iterations` is
the usual speed knob on accelerators, at the cost of that parity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from brax.envs.base import Env, State
from mujoco import mjx

from mdt_jax.envs.tasks import Task, get_task, transition


class MjxEnv(Env):
    """One env of a task in MJX (vmap it, or use `brax.envs.wrappers.training.VmapWrapper`).

    `State.info` holds `steps` (int32), `truncation` (float, 1 once `max_episode_steps` steps
    were taken, independently of termination, as Gymnasium's TimeLimit) and `nan_action` (bool,
    whether the last action had non-finite entries, which were replaced by 0). `State.done` is
    terminated or truncated; `State.metrics` holds the reward terms, x position and x velocity.
    """

    def __init__(self, task: str | Task, iterations: int | None = None,
                 ls_iterations: int | None = None):
        """Puts the task's model on the default device, optionally overriding solver iterations."""
        self.task = get_task(task)
        model = self.task.load_model()
        if iterations is not None:
            model.opt.iterations = iterations
        if ls_iterations is not None:
            model.opt.ls_iterations = ls_iterations
        self.sys = mjx.put_model(model)
        self.dt = float(model.opt.timestep) * self.task.frame_skip

    def reset(self, rng: jax.Array) -> State:
        """State at a `sample_initial(rng)`; the episode clock starts at 0."""
        return self.init_state(*self.sample_initial(rng))

    def sample_initial(self, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(qpos, qvel) with Gymnasium's reset noise around (qpos0, 0)."""
        s, k_pos, k_vel = self.task.reset_noise_scale, *jax.random.split(rng)
        qpos = self.sys.qpos0 + jax.random.uniform(k_pos, (self.sys.nq,), minval=-s, maxval=s)
        if self.task.qvel_noise == "normal":
            return qpos, s * jax.random.normal(k_vel, (self.sys.nv,))
        return qpos, jax.random.uniform(k_vel, (self.sys.nv,), minval=-s, maxval=s)

    def init_state(self, qpos: jax.Array, qvel: jax.Array) -> State:
        """State at a given (nq,) qpos and (nv,) qvel, as Gymnasium's `set_state`."""
        data = mjx.forward(self.sys, mjx.make_data(self.sys).replace(qpos=qpos, qvel=qvel))
        obs, _, _, metrics = transition(self.task, data.qpos[0], data.qpos, data.qvel,
                                        jnp.zeros(self.action_size), self.dt, jnp)
        zero = jnp.zeros(())
        info = dict(steps=jnp.zeros((), jnp.int32), truncation=zero, nan_action=jnp.zeros((), bool))
        return State(data, obs, zero, zero, jax.tree.map(jnp.zeros_like, metrics), info)

    def step(self, state: State, action: jax.Array) -> State:
        """Applies `action` (act_dim,) for `frame_skip` physics steps."""
        finite = jnp.isfinite(action)
        action = jnp.where(finite, action, 0.0)
        data0 = state.pipeline_state
        data = jax.lax.fori_loop(0, self.task.frame_skip, lambda _, d: mjx.step(self.sys, d),
                                 data0.replace(ctrl=action))
        obs, reward, terminated, metrics = transition(
            self.task, data0.qpos[0], data.qpos, data.qvel, action, self.dt, jnp)
        steps = state.info["steps"] + 1
        truncation = (steps >= self.task.max_episode_steps).astype(reward.dtype)
        done = jnp.maximum(terminated.astype(reward.dtype), truncation)
        info = dict(state.info, steps=steps, truncation=truncation,
                    nan_action=~finite.all())
        return state.replace(pipeline_state=data, obs=obs, reward=reward, done=done,
                             metrics=metrics, info=info)

    @property
    def observation_size(self) -> int:
        return self.task.obs_dim

    @property
    def action_size(self) -> int:
        return self.task.act_dim

    @property
    def backend(self) -> str:
        return "mjx"
