"""One rollout loop on the native executor: a batch of episodes of a host policy.

`run_episodes(env, policy, ...)` steps every slot of a `NativeBatchEnv` together until each slot
is done or `max_steps` loop steps have run, and returns per slot the reward summed over its live
steps, the number of live steps and the number of live steps whose action had a non-finite entry
(`Rollout`), plus, with `record`, every step's transition. It is the one loop behind the DT
evaluator (`mdt_jax.evaluate`, batched and batch-1), the random and expert reference returns
(`behaviour.reference`), the SAC actor's evaluation (`behaviour.sac.evaluate_policy`) and dataset
collection (`behaviour.collect.run_wave`), the way brax's `training/acting.py` serves every agent.

Bookkeeping (the same for all of them):
- a slot is live from its start until its episode terminates or is truncated by the env's time
  limit (or, with `slot_steps`, until it holds `slot_steps` steps of finished episodes and then
  finishes the one it is in: a finished episode is reset at once with `env.reset_where`, drawing
  its reset noise from `rng`, so the batch stays full however short the episodes are);
- every slot is stepped every loop step, finished ones too, with whatever action the policy gives
  them (their results are masked: they add nothing to the returns, lengths or NaN counts);
- the loop stops once no slot is live, or after `max_steps` steps (the episodes still running are
  cut there; None: until every slot is done, which the env's 1000-step time limit guarantees).

A policy is either a plain `Policy`, `policy(obs, rng) -> actions` for the whole batch (called on
every slot every step, so the RNG stream it draws from does not depend on which episodes ended),
or an `EpisodePolicy`, an object with per-episode state (the DT's context and return-to-go):
`reset(n)` before the first step, `policy(obs, t, live) -> actions` at loop step t and
`observe(reward)` after the step.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from mdt_jax.envs.native import NativeBatchEnv

Policy = Callable[[np.ndarray, np.random.Generator], np.ndarray]
FIELDS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")


@runtime_checkable
class EpisodePolicy(Protocol):
    """A host policy with state per episode, for N slots stepped together."""

    def reset(self, n: int) -> None:
        """Start n episodes (one per env slot)."""

    def __call__(self, obs: np.ndarray, t: int, live: np.ndarray) -> np.ndarray:
        """(N, act_dim) actions for loop step t from obs (N, obs_dim); rows where `live` (N,) is
        False belong to finished episodes: they are stepped, never counted."""

    def observe(self, reward: np.ndarray) -> None:
        """The (N,) rewards of the step just taken."""


class _Stateless:
    """A plain `Policy` as an `EpisodePolicy`: the whole batch every step, from `rng`."""

    def __init__(self, policy: Policy, rng: np.random.Generator):
        self.policy, self.rng = policy, rng

    def reset(self, n: int) -> None:
        pass

    def __call__(self, obs, t, live):
        return self.policy(obs, self.rng)

    def observe(self, reward) -> None:
        pass


@dataclasses.dataclass
class Rollout:
    """Per slot: `returns` (N,) float64 reward summed over its live steps, `lengths` (N,) int64 its
    live steps, `nan_actions` (N,) int64 its live steps with a non-finite action entry. With one
    episode per slot these are the episode's. `steps` (with `record`): the D4RL `FIELDS` plus
    `live`, each (N, T, ...) over the T loop steps run."""

    returns: np.ndarray
    lengths: np.ndarray
    nan_actions: np.ndarray
    steps: dict[str, np.ndarray] | None = None

    def episodes(self) -> list[dict]:
        """The recorded live steps split into episodes (dicts of `FIELDS`), slot by slot, in order;
        an episode ends at a step with `terminals` or `timeouts` (a slot's last episode cut by
        `max_steps` is kept, unfinished)."""
        if self.steps is None:
            raise ValueError("Rollout.episodes: the rollout was run without record=True")
        live = self.steps["live"]
        out = []
        for i in range(live.shape[0]):
            rows = {k: self.steps[k][i, live[i]] for k in FIELDS}
            ends = np.flatnonzero(rows["terminals"] | rows["timeouts"]) + 1
            if not ends.size or ends[-1] < len(rows["rewards"]):
                ends = np.r_[ends, len(rows["rewards"])]
            for a, b in zip(np.r_[0, ends[:-1]], ends):
                out.append({k: v[a:b] for k, v in rows.items()})
        return out


def _positive_or_none(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0):
        raise ValueError(f"run_episodes: {name} must be a positive int or None, got {v!r}")


def run_episodes(env: NativeBatchEnv, policy: Policy | EpisodePolicy, *, rng: np.random.Generator | None = None,
                 starts: tuple[np.ndarray, np.ndarray] | None = None, max_steps: int | None = None,
                 slot_steps: int | None = None, record: bool = False,
                 progress: Callable[[int], None] | None = None) -> Rollout:
    """Run one episode per slot of `env` (or, with `slot_steps`, episodes back to back) under
    `policy`; see the module docstring for the bookkeeping.

    Args:
      env: the batch; its N slots are the episodes.
      policy: a plain `Policy` (drawing from `rng`) or an `EpisodePolicy`.
      rng: the generator a plain policy draws from, and the reset noise when `starts` is None or
        `slot_steps` is given (in that order: `env.reset(rng)` first).
      starts: (qpos (N, nq), qvel (N, nv)) set with `env.set_state`; None resets with `rng`.
      max_steps: cap on the loop steps; None runs until every slot is done.
      slot_steps: auto-reset: a slot runs episodes until it holds this many steps of finished
        ones, then finishes the one it is in. A plain `Policy` only.
      record: keep every step's transition (`Rollout.steps`).
      progress: called after each step with the number of slots that were live in it.
    """
    _positive_or_none("max_steps", max_steps)
    _positive_or_none("slot_steps", slot_steps)
    stateful = isinstance(policy, EpisodePolicy)
    if not stateful and not callable(policy):
        raise TypeError(f"run_episodes: policy must be callable, got {type(policy).__name__}")
    if stateful and slot_steps is not None:
        raise ValueError("run_episodes: slot_steps (auto-reset) takes a plain policy(obs, rng); an EpisodePolicy's "
                         "state is one episode per slot")
    if rng is None and (not stateful or starts is None or slot_steps is not None):
        raise ValueError("run_episodes: rng is required for a plain policy, a reset (starts=None) or slot_steps")
    n = env.num_envs
    if starts is None:
        obs = env.reset(rng)
    else:
        qpos, qvel = starts
        if np.shape(qpos) != env.state()[0].shape or np.shape(qvel) != env.state()[1].shape:
            raise ValueError(f"run_episodes: starts must be qpos {env.state()[0].shape} and qvel "
                             f"{env.state()[1].shape}, got {np.shape(qpos)} and {np.shape(qvel)}")
        obs = env.set_state(qpos, qvel)
    act_fn = policy if stateful else _Stateless(policy, rng)
    act_fn.reset(n)
    live = np.ones(n, bool)
    ret, length, nan = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, np.int64)
    held, ep_len = np.zeros(n, np.int64), np.zeros(n, np.int64)  # slot_steps: finished-episode steps, current one
    steps = {k: [] for k in FIELDS + ("live",)} if record else None
    for t in (range(max_steps) if max_steps is not None else itertools.count()):
        if not live.any():
            break
        act = act_fn(obs, t, live)
        nxt, r, term, trunc, info = env.step(act)
        if record:
            for k, v in zip(steps, (obs, act, r, term, trunc, nxt, live.copy())):
                steps[k].append(v)
        ret += np.where(live, r, 0.0)
        length += live
        nan += live & info["nan_action"]
        act_fn.observe(r)
        end = term | trunc
        n_live = int(live.sum())
        if slot_steps is None:
            live = live & ~end
            obs = nxt
        else:
            ep_len += 1
            done = end & live
            held += np.where(done, ep_len, 0)
            ep_len[end] = 0
            live = live & ~(done & (held >= slot_steps))
            restart = done & live
            obs = env.reset_where(restart, rng) if restart.any() else nxt
        if progress is not None:
            progress(n_live)
    if record:
        steps = {k: np.stack(v, 1) for k, v in steps.items()}
    return Rollout(ret, length, nan, steps)
