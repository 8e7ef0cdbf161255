"""Soft actor-critic with Brax's trainer on the MJX executor: the accelerator behaviour-policy trainer.

`train` runs `brax.training.agents.sac.train` on `MjxEnv(task)`: acting, replay buffer and updates
all stay on the device, `num_envs` environments stepped together. Its results are policy
checkpoints in our format (`WORKDIR/policies/step_XXXXXXXX`, orbax + JSON, as `sac.train` writes
them), so `launch.select_behaviour` and dataset collection take them as they take the CPU
trainer's.

Brax's SAC actor is an MLP (`hidden_0` ... `hidden_n`, relu, the last the output layer) whose
output (loc, s) parameterizes `NormalTanhDistribution`: std = softplus(s) + 0.001. That is our
actor with `PolicyConfig.std = "softplus"`; `from_brax` renames the layers, and folds Brax's
observation normalization ((obs - mean) / std, when `normalize_observations`) into the first
layer, so the converted actor takes raw observations.

How this version of Brax (0.14) is used:

* Episodes: `MjxEnv` keeps its own step count and Gymnasium time limit (`info["truncation"]`),
  so the env is wrapped by `wrap` (vmap, an optional shorter `episode_length` limit, Brax's
  auto-reset) instead of Brax's `EpisodeWrapper`, which would count the steps a second time.
  Brax's auto-reset restarts each env from its own first initial state. Brax's critic loss leaves
  out truncated transitions; terminal ones (falls) cut the bootstrap.
* Checkpoints: Brax's SAC has no parameter callback, but with `checkpoint_logdir` it writes
  (normalizer, policy params) to `WORKDIR/brax/<step:012d>` just before it calls `progress_fn`
  for that step. `progress_fn` reads that checkpoint back, converts it, evaluates the actor
  deterministically on the native executor (`sac.evaluate_policy`, the number `sac.train`
  records) and saves it. Checkpoints fall every `(env_steps - start_steps) / n` env steps, with
  n = round((env_steps - start_steps) / save_every); their names carry Brax's exact step count.
* Replay prefill: the first `start_steps` env steps act with the initial (random) actor, not
  uniform random actions as `sac.train` does. The temperature starts at 1 (log alpha 0) and is
  tuned towards entropy -act_dim, as in `sac.train`.
* No resume: a rerun needs a new workdir.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from brax.envs.base import Wrapper
from brax.envs.wrappers.training import AutoResetWrapper, VmapWrapper

from mdt_jax import envs
from mdt_jax.behaviour import policy as pol
from mdt_jax.fileio import write_json_atomic


@dataclasses.dataclass(frozen=True)
class BraxSACConfig:
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 3e-4  # actor and critics (Brax's temperature optimizer has its own 3e-4)
    gamma: float = 0.99
    tau: float = 0.005
    batch_size: int = 256
    buffer_size: int = 1_000_000
    start_steps: int = 10_000  # env steps of replay prefill before any update
    num_envs: int = 128  # envs stepped together, each actor step
    grad_updates_per_step: int = 32  # SAC updates per actor step (num_envs env steps)
    reward_scaling: float = 1.0
    normalize_observations: bool = True  # folded into the first layer by from_brax
    episode_length: int = 1000  # <= the task's time limit; shorter is for quick checks
    num_eval_envs: int = 16  # Brax's own evaluation on MJX (recorded beside ours)
    iterations: int | None = None  # MJX solver iterations; None keeps the MJCF's (see envs/mjx.py)
    ls_iterations: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        for name in ("batch_size", "buffer_size", "num_envs", "grad_updates_per_step", "episode_length",
                     "num_eval_envs"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"brax.{name} must be positive, got {getattr(self, name)!r}")
        if not self.hidden or min(self.hidden) <= 0:
            raise ValueError(f"brax.hidden must be positive layer widths, got {self.hidden!r}")
        if not 0 < self.gamma <= 1 or not 0 < self.tau <= 1:
            raise ValueError(f"brax.gamma and brax.tau must lie in (0, 1], got {self.gamma}, {self.tau}")
        if self.lr <= 0 or self.reward_scaling <= 0 or self.start_steps < 0:
            raise ValueError("brax.lr and brax.reward_scaling must be positive and brax.start_steps >= 0")


# ---------------------------------------------------------------------------------------------
# Brax's actor -> ours.

def from_brax(params, task: str, normalizer: Any = None) -> tuple[pol.PolicyConfig, dict]:
    """(PolicyConfig, params) of our actor computing what Brax's SAC actor computes.

    `params`: Brax's policy params (`{"params": {"hidden_0": {"kernel", "bias"}, ...}}`, or the
    inner dict), from `make_sac_networks` with relu, no layer norm, tanh_normal. `normalizer`:
    None when Brax ran with `normalize_observations=False`, else its normalizer state (anything
    with `.mean` and `.std`, e.g. `running_statistics.RunningStatisticsState`), folded into the
    first layer: ((x - m) / s) @ W + b = x @ (W / s[:, None]) + (b - (m / s) @ W), in float64.
    """
    t = envs.get_task(task)
    layers = params.get("params", params) if isinstance(params, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"from_brax: params must be Brax's policy params dict, got {type(params).__name__}")
    n = len(layers)
    if sorted(layers) != sorted(f"hidden_{i}" for i in range(n)):
        raise ValueError(f"from_brax: expected layers hidden_0..hidden_{n - 1} (an MLP without layer norm), "
                         f"got {sorted(layers)}")
    ws = [np.asarray(layers[f"hidden_{i}"]["kernel"], np.float64) for i in range(n)]
    bs = [np.asarray(layers[f"hidden_{i}"]["bias"], np.float64) for i in range(n)]
    obs_dim, out_dim = ws[0].shape[0], ws[-1].shape[1]
    if (obs_dim, out_dim) != (t.obs_dim, 2 * t.act_dim):
        raise ValueError(f"from_brax: the network maps {obs_dim} -> {out_dim}, but {t.name} needs "
                         f"{t.obs_dim} -> 2 * {t.act_dim}")
    if normalizer is not None:
        mean = np.asarray(normalizer.mean, np.float64)
        std = np.asarray(normalizer.std, np.float64)
        if mean.shape != (obs_dim,) or std.shape != (obs_dim,):
            raise ValueError(f"from_brax: normalizer mean/std shapes {mean.shape}/{std.shape} != ({obs_dim},)")
        bs[0] = bs[0] - (mean / std) @ ws[0]
        ws[0] = ws[0] / std[:, None]
    cfg = pol.PolicyConfig(t.name, obs_dim, t.act_dim, tuple(w.shape[1] for w in ws[:-1]), std="softplus")
    dense = lambda w, b: {"kernel": w.astype(np.float32), "bias": b.astype(np.float32)}
    mlp = {f"dense_{i}": dense(ws[i], bs[i]) for i in range(n - 1)} | {"out": dense(ws[-1], bs[-1])}
    return cfg, {"mlp": mlp}


# ---------------------------------------------------------------------------------------------
# The environment as Brax's trainer sees it.

class EpisodeLimit(Wrapper):
    """Also truncates `MjxEnv` episodes once `info["steps"]` reaches `episode_length` (<= the
    task's own limit, which `MjxEnv` applies itself)."""

    def __init__(self, env, episode_length: int):
        super().__init__(env)
        self.episode_length = int(episode_length)

    def step(self, state, action):
        state = self.env.step(state, action)
        trunc = jnp.maximum(state.info["truncation"],
                            (state.info["steps"] >= self.episode_length).astype(state.done.dtype))
        return state.replace(done=jnp.maximum(state.done, trunc), info=dict(state.info, truncation=trunc))


def wrap(env, episode_length: int, action_repeat: int = 1, randomization_fn=None):
    """Brax's `wrap_env_fn` for `MjxEnv`: vmap, episodes cut at `episode_length`, auto-reset."""
    if action_repeat != 1 or randomization_fn is not None:
        raise ValueError("brax_sac: action_repeat must be 1 and there is no domain randomization")
    return AutoResetWrapper(EpisodeLimit(VmapWrapper(env), episode_length))


@contextlib.contextmanager
def _device_put_replicated():
    """Brax 0.14.2 SAC calls `jax.device_put_replicated`, which JAX 0.10 removed; within this
    context it is JAX's documented drop-in (a stacked copy per device, sharded over them)."""
    if hasattr(jax, "device_put_replicated"):  # this JAX still has it
        yield
        return

    def put(x, devices):
        sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("i",)),
                                              jax.sharding.PartitionSpec("i"))
        return jax.tree.map(lambda a: jax.device_put(np.stack([np.asarray(a)] * len(devices)), sharding), x)

    jax.device_put_replicated = put
    try:
        yield
    finally:
        del jax.device_put_replicated


# ---------------------------------------------------------------------------------------------
# The training run (side effects: Brax's loop, checkpoints, logs).

def train(task: str, workdir: str, *, env_steps: int, cfg: BraxSACConfig = BraxSACConfig(), seed: int = 0,
          save_every: int = 50_000, eval_episodes: int = 10, command: str = "", log=print) -> str:
    """Train SAC with Brax on `MjxEnv(task)` for `env_steps` env steps; returns WORKDIR/policies."""
    from brax.training.agents.sac import checkpoint as brax_checkpoint
    from brax.training.agents.sac import networks as sac_networks
    from brax.training.agents.sac import train as brax_train

    from mdt_jax.behaviour.sac import evaluate_policy
    from mdt_jax.envs.mjx import MjxEnv

    t = envs.get_task(task)
    if not 0 < cfg.episode_length <= t.max_episode_steps:
        raise ValueError(f"brax.episode_length must lie in [1, {t.max_episode_steps}] for {t.name}, "
                         f"got {cfg.episode_length}")
    if env_steps <= cfg.start_steps:
        raise ValueError(f"env_steps ({env_steps}) must exceed brax.start_steps ({cfg.start_steps})")
    if save_every <= 0:
        raise ValueError(f"save_every must be positive, got {save_every}")
    run_path = os.path.join(workdir, "run.json")
    if os.path.exists(run_path):
        raise FileExistsError(f"{workdir} holds a run already (the Brax trainer does not resume); use a new workdir")
    os.makedirs(workdir, exist_ok=True)
    run = {"task": t.name, "seed": seed, "env_steps": env_steps, "save_every": save_every, "algo": "brax_sac",
           "brax": dataclasses.asdict(cfg) | {"hidden": list(cfg.hidden)}}
    write_json_atomic(run_path, run)
    brax_dir = os.path.join(workdir, "brax")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    n_saves = max(1, round((env_steps - cfg.start_steps) / save_every))
    t0 = time.time()

    def progress(step: int, metrics: dict) -> None:
        row = {"env_steps": int(step), "wall_s": time.time() - t0}
        row |= {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        brax_return = row.get("eval/episode_reward")
        if step > 0:  # Brax wrote this step's checkpoint just before calling us
            normalizer, policy_params = brax_checkpoint.load(os.path.join(brax_dir, f"{step:012d}"))
            pcfg, params = from_brax(policy_params, t.name, normalizer if cfg.normalize_observations else None)
            evals = evaluate_policy(t.name, params, eval_episodes, seed=20_000 + step, std=pcfg.std)
            row |= {"eval_return": float(evals.mean()), "eval_std": float(evals.std())}
            meta = {"env_steps": int(step), "seed": seed, "wall_s": time.time() - t0,
                    "eval_return_mean": float(evals.mean()), "eval_return_std": float(evals.std()),
                    "eval_episodes": eval_episodes, "brax_eval_return": brax_return, "algo": "brax_sac",
                    "brax": run["brax"], "command": command}
            pol.save_policy(os.path.join(workdir, "policies", f"step_{step:08d}"), params, pcfg, meta,
                            overwrite=True)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        ours = f"eval {row['eval_return']:8.1f} ± {row['eval_std']:6.1f}  " if "eval_return" in row else ""
        brax_eval = float("nan") if brax_return is None else brax_return
        log(f"{t.name} {step:>8d} steps  {ours}brax eval {brax_eval:8.1f}  "
            f"{row.get('training/sps', float('nan')):.0f} env-steps/s  ({row['wall_s'] / 60:.1f} min)")

    network_factory = functools.partial(sac_networks.make_sac_networks, hidden_layer_sizes=cfg.hidden)
    with _device_put_replicated():
        brax_train.train(
            MjxEnv(t, iterations=cfg.iterations, ls_iterations=cfg.ls_iterations), num_timesteps=env_steps,
            episode_length=cfg.episode_length, wrap_env_fn=wrap, num_envs=cfg.num_envs,
            num_eval_envs=cfg.num_eval_envs, learning_rate=cfg.lr, discounting=cfg.gamma, seed=seed,
            batch_size=cfg.batch_size, num_evals=n_saves + 1, normalize_observations=cfg.normalize_observations,
            reward_scaling=cfg.reward_scaling, tau=cfg.tau, min_replay_size=cfg.start_steps,
            max_replay_size=min(cfg.buffer_size, env_steps), grad_updates_per_step=cfg.grad_updates_per_step,
            deterministic_eval=True, network_factory=network_factory, progress_fn=progress,
            checkpoint_logdir=brax_dir)
    return os.path.join(workdir, "policies")
