"""Soft actor-critic on the native executor: the CPU behaviour-policy trainer.

The loop alternates two parts. Python steps `num_envs` MuJoCo C environments for `chunk` steps,
acting with a NumPy copy of the actor (microseconds per batch; no jit dispatch per step); then
one jitted, donated call (`train_chunk`) writes those transitions into the replay buffer, which
lives in device memory, and runs `chunk * num_envs * utd` SAC updates in a `lax.scan`, each
sampling its own batch from the buffer. So the actor acting in the environment is at most `chunk`
steps behind the learner, and Python costs nothing per update.

SAC as in Haarnoja et al. (2018, "applications" version): twin Q critics with Polyak-averaged
targets, a tanh-Gaussian actor, and the temperature tuned towards entropy -act_dim. Terminal
transitions (falls) cut the bootstrap; time-limit truncations do not.

Every `save_every` env steps the actor is saved as a policy checkpoint (`WORKDIR/policies/
step_XXXXXXXX`, with its deterministic evaluation return in the metadata), so that "medium"
policies exist along the way; and the whole trainer state (networks, optimizers, replay buffer,
RNGs) is saved to `WORKDIR/state`, from which a rerun of the same command resumes (episodes in
flight at the save are restarted). Metrics go to `WORKDIR/metrics.jsonl`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdt_jax import envs
from mdt_jax.behaviour import policy as pol
from mdt_jax.fileio import Store, tree_codec, write_json_atomic


@dataclasses.dataclass(frozen=True)
class SACConfig:
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    batch_size: int = 256
    buffer_size: int = 1_000_000
    start_steps: int = 10_000  # uniform random actions before this many env steps (and no updates)
    utd: float = 1.0  # gradient updates per env transition
    num_envs: int = 1
    chunk: int = 50  # env steps (per env) between jitted update calls
    init_alpha: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        for name in ("batch_size", "buffer_size", "num_envs", "chunk"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"sac.{name} must be positive, got {getattr(self, name)!r}")
        if not 0 < self.gamma <= 1 or not 0 < self.tau <= 1:
            raise ValueError(f"sac.gamma and sac.tau must lie in (0, 1], got {self.gamma}, {self.tau}")
        if self.utd <= 0 or self.lr <= 0 or self.init_alpha <= 0:
            raise ValueError("sac.utd, sac.lr and sac.init_alpha must be positive")
        if (self.chunk * self.num_envs * self.utd) % 1:
            raise ValueError(f"sac.chunk * sac.num_envs * sac.utd must be a whole number of updates, got "
                             f"{self.chunk * self.num_envs * self.utd}")

    @property
    def updates_per_chunk(self) -> int:
        return int(self.chunk * self.num_envs * self.utd)


class Critic(nn.Module):
    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, obs, act):
        x = jnp.concatenate([obs, act], -1)
        return tuple(pol.MLP(self.hidden, 1, name=f"q{i}")(x)[..., 0] for i in range(2))


class SACState(NamedTuple):
    actor: Any
    critic: Any
    target: Any
    log_alpha: jax.Array
    opt_actor: Any
    opt_critic: Any
    opt_alpha: Any
    updates: jax.Array


def _opt(cfg: SACConfig):
    return optax.adam(cfg.lr)


def init_state(pcfg: pol.PolicyConfig, cfg: SACConfig, rng: jax.Array) -> SACState:
    ka, kc = jax.random.split(rng)
    actor = pol.init_actor(pcfg, ka)
    critic = Critic(cfg.hidden).init(kc, jnp.zeros((1, pcfg.obs_dim)), jnp.zeros((1, pcfg.act_dim)))["params"]
    log_alpha = jnp.asarray(np.log(cfg.init_alpha), jnp.float32)
    o = _opt(cfg)
    return SACState(actor, critic, jax.tree.map(jnp.copy, critic), log_alpha, o.init(actor), o.init(critic), o.init(log_alpha),
                    jnp.zeros((), jnp.int32))


def init_buffer(pcfg: pol.PolicyConfig, capacity: int) -> dict:
    z = lambda *s: jnp.zeros((capacity,) + s, jnp.float32)
    return {"obs": z(pcfg.obs_dim), "act": z(pcfg.act_dim), "rew": z(), "next_obs": z(pcfg.obs_dim), "term": z(),
            "ptr": jnp.zeros((), jnp.int32), "size": jnp.zeros((), jnp.int32)}


def insert(buf: dict, new: dict) -> dict:
    """Write the rows of `new` (keys obs, act, rew, next_obs, term) into the ring buffer."""
    cap = buf["obs"].shape[0]
    n = new["obs"].shape[0]
    idx = (buf["ptr"] + jnp.arange(n)) % cap
    out = {k: buf[k].at[idx].set(new[k].astype(jnp.float32)) for k in new}
    return out | {"ptr": (buf["ptr"] + n) % cap, "size": jnp.minimum(buf["size"] + n, cap)}


def update(pcfg: pol.PolicyConfig, cfg: SACConfig, state: SACState, batch: dict, rng: jax.Array):
    """One SAC step: critics, then actor and temperature, then the Polyak target."""
    crit = Critic(cfg.hidden)
    o = _opt(cfg)
    k_next, k_pi = jax.random.split(rng)
    alpha = jnp.exp(state.log_alpha)

    next_a, next_logp = pol.sample_action(pcfg, state.actor, batch["next_obs"], k_next)
    tq1, tq2 = crit.apply({"params": state.target}, batch["next_obs"], next_a)
    y = batch["rew"] + cfg.gamma * (1.0 - batch["term"]) * (jnp.minimum(tq1, tq2) - alpha * next_logp)
    y = jax.lax.stop_gradient(y)

    def critic_loss(p):
        q1, q2 = crit.apply({"params": p}, batch["obs"], batch["act"])
        return 0.5 * (jnp.mean((q1 - y) ** 2) + jnp.mean((q2 - y) ** 2)), jnp.mean(q1)

    (c_loss, q_mean), g = jax.value_and_grad(critic_loss, has_aux=True)(state.critic)
    upd, opt_critic = o.update(g, state.opt_critic, state.critic)
    critic = optax.apply_updates(state.critic, upd)

    def actor_loss(p):
        a, logp = pol.sample_action(pcfg, p, batch["obs"], k_pi)
        q1, q2 = crit.apply({"params": critic}, batch["obs"], a)
        return jnp.mean(alpha * logp - jnp.minimum(q1, q2)), logp

    (a_loss, logp), g = jax.value_and_grad(actor_loss, has_aux=True)(state.actor)
    upd, opt_actor = o.update(g, state.opt_actor, state.actor)
    actor = optax.apply_updates(state.actor, upd)

    target_entropy = -float(pcfg.act_dim)
    entropy_gap = jax.lax.stop_gradient(jnp.mean(logp) + target_entropy)
    g_alpha = -entropy_gap  # d/dlog_alpha of -log_alpha * (logp + target_entropy)
    upd, opt_alpha = o.update(g_alpha, state.opt_alpha, state.log_alpha)
    log_alpha = optax.apply_updates(state.log_alpha, upd)

    target = jax.tree.map(lambda t, c: (1 - cfg.tau) * t + cfg.tau * c, state.target, critic)
    metrics = {"critic_loss": c_loss, "actor_loss": a_loss, "q": q_mean, "alpha": alpha, "entropy": -jnp.mean(logp)}
    return SACState(actor, critic, target, log_alpha, opt_actor, opt_critic, opt_alpha, state.updates + 1), metrics


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def train_chunk(pcfg: pol.PolicyConfig, cfg: SACConfig, num_updates: int, state: SACState, buf: dict, new: dict,
                rng: jax.Array):
    """Insert `new` transitions, then `num_updates` SAC updates on batches drawn from the buffer.

    The RNG of update u is `fold_in(rng, u)`; returns (state, buffer, mean metrics)."""
    buf = insert(buf, new)
    if num_updates == 0:
        return state, buf, {}

    def body(st, u):
        k_idx, k_upd = jax.random.split(jax.random.fold_in(rng, u))
        idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, buf["size"])
        batch = {k: buf[k][idx] for k in ("obs", "act", "rew", "next_obs", "term")}
        return update(pcfg, cfg, st, batch, k_upd)

    state, metrics = jax.lax.scan(body, state, jnp.arange(num_updates))
    return state, buf, jax.tree.map(jnp.mean, metrics)


def evaluate_policy(task: str, params, episodes: int, seed: int, deterministic: bool = True,
                    std: str = "exp") -> np.ndarray:
    """Returns of `episodes` episodes of the actor (`std`: its config's), run together on the
    native executor (`envs.run_episodes`: reset noise, then the actor's samples, from
    `default_rng(seed)`; each episode until it ends or hits the time limit)."""
    env = envs.NativeBatchEnv(task, episodes, nthread=1)
    return envs.run_episodes(env, pol.numpy_policy(params, deterministic, std), rng=np.random.default_rng(seed)).returns


# ---------------------------------------------------------------------------------------------
# The training loop (side effects: env stepping, checkpoints, logs).

STATE_KEY = "state"  # WORKDIR/state/{arrays, host.json}


def _state_store(workdir: str) -> Store:
    return Store(workdir, tree_codec("arrays", header="host.json"), what="behaviour trainer state")


def _save_state(store: Store, state: SACState, buf: dict, host: dict) -> None:
    store.put(STATE_KEY, ({"state": state._asdict(), "buffer": buf}, host), overwrite=True)


def _load_state(store: Store, state: SACState, buf: dict):
    target = {"state": jax.tree.map(np.asarray, state._asdict()), "buffer": jax.tree.map(np.asarray, buf)}
    got, host = store.get(STATE_KEY, target=target)
    return SACState(**got["state"]), got["buffer"], host


def train(task: str, workdir: str, *, env_steps: int, cfg: SACConfig = SACConfig(), seed: int = 0,
          save_every: int = 50_000, eval_every: int = 10_000, eval_episodes: int = 10,
          stop_return: float = 0.0, command: str = "", log=print) -> str:
    """Train SAC on `task` for `env_steps` environment steps; returns WORKDIR/policies.

    With `stop_return` > 0, training stops early (saving a policy there) once an evaluation's
    mean return reaches it. Resumes from WORKDIR/state when it exists (the config must match the
    one that made it).
    """
    t = envs.get_task(task)
    pcfg = pol.PolicyConfig(t.name, t.obs_dim, t.act_dim, cfg.hidden)
    os.makedirs(workdir, exist_ok=True)
    run = {"task": t.name, "seed": seed, "env_steps": env_steps, "save_every": save_every, "stop_return": stop_return,
           "sac": dataclasses.asdict(cfg) | {"hidden": list(cfg.hidden)}}
    run_path = os.path.join(workdir, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(run) if k not in ("env_steps", "stop_return") and old.get(k) != run.get(k))
        if diff:
            raise ValueError(f"{workdir} holds a behaviour run with another config (differs in {diff}); "
                             "use a new workdir")
    write_json_atomic(run_path, run)
    steps_per_chunk = cfg.chunk * cfg.num_envs
    if save_every % steps_per_chunk or eval_every % steps_per_chunk:
        raise ValueError(f"save_every and eval_every must be multiples of chunk * num_envs = {steps_per_chunk}")

    state, buf = init_state(pcfg, cfg, jax.random.key(seed)), init_buffer(pcfg, cfg.buffer_size)
    host = {"env_steps": 0, "wall_s": 0.0, "episodes": 0,
            "np_rng": np.random.default_rng([seed, 1]).bit_generator.state}
    store = _state_store(workdir)
    if STATE_KEY in store:
        state, buf, host = _load_state(store, state, buf)
        state, buf = jax.device_put(state), jax.device_put(buf)
        log(f"resumed from {store.path(STATE_KEY)} at {host['env_steps']} env steps")
    rng = np.random.default_rng()
    rng.bit_generator.state = host["np_rng"]
    key = jax.random.key(seed)

    env = envs.NativeBatchEnv(t, cfg.num_envs, nthread=1)
    obs = env.reset(rng)
    ep_ret = np.zeros(cfg.num_envs)
    recent: list[float] = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    actor_np = jax.tree.map(np.asarray, state.actor)
    t0, steps0, last = time.time() - host["wall_s"], host["env_steps"], time.time()
    # The acting loop is not `envs.run_episodes`: it is a continuing actor-learner stream, not a
    # batch of episodes run to their end. Slots never retire, episodes straddle the chunk
    # boundaries (their returns carry over between chunks and a resume restarts them), and the
    # policy switches from uniform to the actor at a global step count inside a chunk.
    while host["env_steps"] < env_steps:
        rows = {k: [] for k in ("obs", "act", "rew", "next_obs", "term")}
        acting = pol.numpy_policy(actor_np)
        for _ in range(cfg.chunk):
            if host["env_steps"] < cfg.start_steps:
                act = rng.uniform(-1.0, 1.0, (cfg.num_envs, t.act_dim))
            else:
                act = acting(obs, rng)
            nxt, r, term, trunc, _ = env.step(act)
            for k, v in zip(rows, (obs, act, r, nxt, term)):
                rows[k].append(v)
            ep_ret += r
            done = term | trunc
            obs = nxt
            if done.any():
                recent += ep_ret[done].tolist()
                host["episodes"] += int(done.sum())
                obs = env.reset_where(done, rng)
                ep_ret[done] = 0.0
            host["env_steps"] += cfg.num_envs
        new = {k: np.concatenate(v) if k in ("obs", "act", "next_obs") else np.concatenate(v).astype(np.float32)
               for k, v in rows.items()}
        n_upd = cfg.updates_per_chunk if host["env_steps"] > cfg.start_steps else 0
        state, buf, m = train_chunk(pcfg, cfg, n_upd, state, buf, new,
                                    jax.random.fold_in(key, host["env_steps"]))
        actor_np = jax.tree.map(np.asarray, state.actor)
        n = host["env_steps"]
        if n % eval_every == 0:
            evals = evaluate_policy(t.name, actor_np, eval_episodes, seed=10_000 + n)
            now = time.time()
            row = {"env_steps": n, "updates": int(state.updates), "eval_return": float(evals.mean()),
                   "eval_std": float(evals.std()), "train_return": float(np.mean(recent)) if recent else None,
                   "episodes": host["episodes"], "wall_s": now - t0,
                   "env_steps_per_s": (n - steps0) / max(now - last, 1e-9)} | {k: float(v) for k, v in m.items()}
            steps0, last, recent = n, now, []
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"{t.name} {n:>8d} steps  eval {row['eval_return']:8.1f} ± {row['eval_std']:6.1f}  "
                f"train {row['train_return'] or float('nan'):8.1f}  alpha {row.get('alpha', float('nan')):.3f}  "
                f"{row['env_steps_per_s']:.0f} env-steps/s  ({row['wall_s'] / 60:.1f} min)")
        stop = stop_return > 0 and n % eval_every == 0 and row["eval_return"] >= stop_return
        if n % save_every == 0 or n >= env_steps or stop:
            evals = evaluate_policy(t.name, actor_np, eval_episodes, seed=20_000 + n)
            host["wall_s"] = time.time() - t0
            host["np_rng"] = rng.bit_generator.state
            meta = {"env_steps": n, "updates": int(state.updates), "seed": seed, "wall_s": host["wall_s"],
                    "eval_return_mean": float(evals.mean()), "eval_return_std": float(evals.std()),
                    "eval_episodes": eval_episodes, "algo": "sac", "sac": run["sac"], "command": command}
            pol.save_policy(os.path.join(workdir, "policies", f"step_{n:08d}"), actor_np, pcfg, meta, overwrite=True)
            _save_state(store, state, buf, host)
        if stop:
            log(f"{t.name}: eval return {row['eval_return']:.1f} >= stop_return {stop_return}; stopping")
            break
    return os.path.join(workdir, "policies")
