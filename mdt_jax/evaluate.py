"""Batched closed-loop evaluation: E episodes x T tasks x M parameter sets in one call.

The policy sees what the reference's `get_action` builds from its growing history: the last K
steps, left-padded with zeros and masked (zero padding at evaluation), the action predicted at the
last state token. Its state is a `TokenCache`, a ring of K step slots (step t in slot t % K)
holding every token at block 0's input and block 0's q, k, v of it: those are functions of the
token alone, so each is computed once (`policy_step`) instead of once per step it stays in the
window, and the ring is read in place, its time order given by the attention mask
(`cache_bias`). The action equals the full forward's on the time-ordered window up to float
rounding (tested); it is one implementation for both executors. The return-to-go starts at
target / scale and decreases by r / scale each step; finished episodes are masked and stop
accruing reward.

Executors (`mdt_jax.envs`):
- native (CPU): the loop is `envs.run_episodes` with the DT as its episode policy; physics for
  every episode runs in MuJoCo C; the caches stay on the device and the policy is one jitted call
  per step (`native_step`) over each candidate's live episodes only, its cache rows reordered and
  cut to a power-of-two bucket when episodes end, so that the shapes (and compilations) stay few.
- mjx (GPU/TPU): policy plus physics for the whole episode is one `lax.scan`, vmapped over
  candidates and episodes.

`evaluate_sequential` is the original protocol, step for step: batch 1, a growing history cut
to the last K steps, zero padding (the same `envs.run_episodes` loop on a one-slot env). It
exists to check the batched evaluator against.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import zlib
from typing import Any, Callable, Generator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import envs, sharding
from mdt_jax import trees
from mdt_jax.models.dt import DTConfig, act_cached, apply, param_shapes, step_tokens


@dataclasses.dataclass(frozen=True)
class TaskStats:
    """Per-task state normalisation (from the training dataset) and the rtg target."""

    state_mean: np.ndarray
    state_std: np.ndarray
    target_return: float
    rtg_scale: float = 1000.0

    @classmethod
    def of(cls, norm, target_return: float) -> "TaskStats":
        """A model's normaliser (`mdt_jax.data.Normalizer`) with the rtg target of an episode."""
        return cls(norm.state_mean, norm.state_std, float(target_return), norm.rtg_scale)


@flax.struct.dataclass
class TokenCache:
    """The policy state of a batch of episodes: block 0's inputs of the tokens of their last K steps.

    A ring over K step slots: step t's tokens (rtg, state, action) sit at rows 3 * (t % K) + 0, 1,
    2. Per token it holds x0, the token at block 0's input (embedding, embed_ln, timestep), and qkv,
    block 0's q, k, v of it; both are functions of the token alone
    (`DecisionTransformer.step_tokens`), so each is computed once, when its step is written, and
    the window's other tokens are read from here instead of being embedded and projected again
    every step (exact up to float rounding; about 11% of an H128 L3 policy step's FLOPs). The ring
    is never reordered: `cache_bias` encodes which token sees which. Batch axes lead (N, or (M, E)
    for M candidates x E episodes). Arrays are JAX arrays: on the device across the native loop's
    steps, the carry of the mjx executor's `lax.scan`.
    """

    x0: jax.Array      # (*batch, 3K, H)
    qkv: jax.Array     # (*batch, 3K, 3H)
    action: jax.Array  # (*batch, A): the last step's predicted action, whose token the next step writes

    @classmethod
    def zeros(cls, batch: int | tuple[int, ...], cfg: DTConfig) -> "TokenCache":
        """An empty cache (slots never written are masked by `cache_bias`)."""
        batch = (batch,) if isinstance(batch, (int, np.integer)) else tuple(batch)
        T, H = 3 * cfg.context_len, cfg.hidden_size
        return cls(jnp.zeros(batch + (T, H), jnp.float32), jnp.zeros(batch + (T, 3 * H), jnp.float32),
                   jnp.zeros(batch + (cfg.act_dim,), jnp.float32))


def cache_bias(t, K: int) -> jax.Array:
    """The additive attention mask (1, 1, 3K, 3K) of a `TokenCache` at step t: slot i holds step
    t - ((t - i) mod K), written once that is >= 0; a token sees the written tokens of earlier
    steps and those of its own step up to itself (rtg, state, action), as the causal mask of the
    time-ordered window with its left padding masked."""
    step = jnp.repeat(t - (t - jnp.arange(K)) % K, 3)
    kind = jnp.tile(jnp.arange(3), K)
    seen = (step[None, :] >= 0) & ((step[None, :] < step[:, None])
                                   | ((step[None, :] == step[:, None]) & (kind[None, :] <= kind[:, None])))
    return jnp.where(seen, 0.0, jnp.finfo(jnp.float32).min)[None, None]


def policy_step(cfg: DTConfig, params, cache: TokenCache, t, obs_norm, rtg, task_id=None, index=None):
    """Write step t's tokens (rtg, state; the action, zero until it is predicted, is masked) and the
    token of step t-1's action, predict step t's action from the last K steps. Returns (actions (N,
    A), cache). One `step_tokens` pass per step embeds both steps' tokens.

    obs_norm (N', <= S) is already normalised (entries past its width are 0) and rtg (N',) scaled,
    for N' >= N, the cache's rows: the new tokens are computed for all N' rows and the first N are
    written, so that their bits do not depend on N (XLA:CPU's dots round differently at different
    row counts) when the native loop shrinks the cache to the episodes still running. With `index`
    (traced), `cache` holds several candidates' caches on a leading axis and the step reads and
    writes candidate `index`'s in place. The action equals `apply(..., outputs='last')` on the
    time-ordered window of the last K steps, zero-padded on the left, up to float rounding (tested).
    """
    K, A = cfg.context_len, cfg.act_dim
    N, n = cache.x0.shape[0 if index is None else 1], obs_norm.shape[0]
    own = (lambda c: c) if index is None else (lambda c: jax.lax.dynamic_index_in_dim(c, index, 0, False))
    at = (lambda *i: i) if index is None else (lambda *i: (index,) + i)  # where in `cache` row i of ours is
    lead = () if index is None else (None,)
    # steps t-1 and t: only step t-1's action token and step t's tokens are kept (the rest of step
    # t-1 was written a step ago; at t = 0 the token lands in a slot the mask hides)
    states = jnp.zeros((n, 2, cfg.state_dim), jnp.float32).at[:, 1, :obs_norm.shape[-1]].set(obs_norm)
    actions = jnp.zeros((n, 2, A), jnp.float32).at[:N, 0].set(own(cache.action))
    rtg = jnp.zeros((n, 2, 1), jnp.float32).at[:, 1, 0].set(rtg)
    ts = jnp.minimum(jnp.maximum(t + jnp.arange(-1, 1), 0), cfg.max_ep_len - 1)
    new = step_tokens(cfg, params, states, actions, rtg, jnp.broadcast_to(ts, (n, 2)).astype(jnp.int32), task_id)
    put = lambda c, v, row: jax.lax.dynamic_update_slice(c, v[lead + (slice(0, N),)], at(0, row, 0))
    slot = t % K
    x0, qkv = (put(put(c, v[:, 3:6], 3 * slot), v[:, 2:3], 3 * ((t - 1) % K) + 2)
               for c, v in zip((cache.x0, cache.qkv), new))
    action = act_cached(cfg, params, own(x0), own(qkv), cache_bias(t, K), 3 * slot + 1, task_id)
    return action, TokenCache(x0, qkv, jax.lax.dynamic_update_slice(cache.action, action[lead], at(0, 0)))


@dataclasses.dataclass
class TaskResult:
    task: str
    returns: np.ndarray       # (M, E)
    lengths: np.ndarray       # (M, E)
    nan_actions: np.ndarray   # (M, E) number of steps whose action had a non-finite entry
    target_return: float

    def summary(self, m: int = 0) -> dict:
        r = self.returns[m]
        return {"task": self.task, "episodes": int(r.size), "return_mean": float(r.mean()),
                "return_std": float(r.std()), "length_mean": float(self.lengths[m].mean()),
                "return_over_target": float(r.mean() / self.target_return),
                "normalized": float(envs.normalized_score(self.task, r.mean())),
                "normalized_std": float(np.std(envs.normalized_score(self.task, r))),
                "nan_action_steps": int(self.nan_actions[m].sum()), "returns": r.tolist()}


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """How a stage evaluates its models: episodes per task (reset seed given per call), the step
    cap, the executor, and whether a single-task model runs only on its own task (else on every
    task whose dims fit it)."""

    episodes: int = 10
    max_steps: int = 1000
    executor: str = "auto"
    own_task: bool = False

    def __post_init__(self):
        for f in ("episodes", "max_steps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"eval.{f}: must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class Row:
    """One evaluated (model or candidate, task): `TaskResult.summary` plus what was evaluated.
    `to_dict()` is the results schema of merge.json / results.json."""

    model: str
    summary: dict
    checkpoint_mode: str = "last"
    checkpoint: str | None = None
    coefficients: dict | None = None

    def to_dict(self) -> dict:
        d = self.summary | {"checkpoint_mode": self.checkpoint_mode, "model": self.model}
        if self.checkpoint is not None:
            d["checkpoint"] = self.checkpoint
        return d | ({"coefficients": self.coefficients} if self.coefficients else {})


def model_stats(model, tasks, target_return: float = 0.0, field: str = "config.checkpoint") -> dict[str, TaskStats]:
    """{task: TaskStats} from `model`'s own normalisers (a `checkpoint.Model`), the rtg target
    `target_return` or, when 0, each task's paper target; a missing normaliser names `field`."""
    stats = {}
    for t in tasks:
        envs.get_task(t)
        try:
            stats[t] = TaskStats.of(model.norm(t), target_return or envs.target_return(t))
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None
    return stats


@dataclasses.dataclass(frozen=True, eq=False)
class EvalRequest:
    """What `evaluate_model` evaluates, as a value: `params` (one model, or candidates stacked on a
    leading axis, one per entry of `stacked_coeffs`) with `model`'s config and normalisers (a
    `checkpoint.Model`) on reset seed `seed`, under `spec`; its rows are labelled `label` and
    `checkpoint`. A stage yields these (`run_lockstep`) so that requests of several stages share
    calls."""

    model: Any
    params: Any
    spec: EvalSpec
    seed: int
    label: str
    checkpoint: str | None = None
    stacked_coeffs: list | None = None

    def tasks(self) -> list[str]:
        """A multi-task model runs on its tasks; a single-task one on its own task
        (`spec.own_task`) or on every task its dims fit."""
        cfg = self.model.cfg
        if cfg.multi:
            return list(cfg.task_names)
        if self.spec.own_task:
            return [self.model.metadata["task"]]
        return [t.name for t in map(envs.get_task, envs.TASKS) if (t.obs_dim, t.act_dim) == (cfg.state_dim, cfg.act_dim)]

    def stacked(self) -> tuple[Any, list[dict]]:
        """(the params with their candidate axis, one added to a single param set; each
        candidate's coefficients, {} where none are given)."""
        n = _num_candidates(self.model.cfg, self.params)  # raises on params that fit no stack
        if n is None:
            return jax.tree.map(lambda x: jnp.asarray(x)[None], self.params), [{}]
        coeffs = list(self.stacked_coeffs) if self.stacked_coeffs is not None else [{}] * n
        if len(coeffs) != n:
            raise ValueError(f"{self.label}: {n} stacked candidates but {len(coeffs)} stacked_coeffs")
        return self.params, coeffs

    def group_key(self, stats: dict) -> tuple:
        """Requests with equal keys run as one call: the same config, tasks, normalisers and spec."""
        norm = tuple((t, np.asarray(st.state_mean, np.float32).tobytes(), np.asarray(st.state_std, np.float32).tobytes(),
                      st.target_return, st.rtg_scale) for t, st in stats.items())
        return self.model.cfg, norm, self.spec


def evaluate_model(model, params, spec: EvalSpec, *, seed: int, label: str, checkpoint: str | None = None,
                   stacked_coeffs: list[dict] | None = None) -> list[Row]:
    """Evaluate `params` (one model, or candidates stacked on a leading axis, one per entry of
    `stacked_coeffs`) with `model`'s config and normalisers (a `checkpoint.Model`) on reset seed
    `seed`; one Row per (candidate, task). A multi-task model runs on its tasks; a single-task one
    on its own task (`spec.own_task`) or on every task its dims fit."""
    return evaluate_requests([EvalRequest(model, params, spec, seed, label, checkpoint, stacked_coeffs)])[0]


def evaluate_requests(requests: Sequence[EvalRequest]) -> list[list[Row]]:
    """Each request's rows (as `evaluate_model` gives them), every group of requests with the same
    config, tasks, normalisers and spec evaluated in one `evaluate` call: their candidates
    stacked, each on its own reset seed. On the native executor a candidate's rows are bitwise
    those it gets alone (`native_policy`), so grouping changes no result."""
    groups: dict[tuple, list[int]] = {}
    stats = []
    for i, r in enumerate(requests):
        stats.append(model_stats(r.model, r.tasks()))
        groups.setdefault(r.group_key(stats[-1]), []).append(i)
    out: list[list[Row] | None] = [None] * len(requests)
    for members in groups.values():
        first = requests[members[0]]
        parts, coeffs = zip(*(requests[i].stacked() for i in members))
        sizes = [len(c) for c in coeffs]
        params = parts[0] if len(parts) == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *parts)
        seeds = [requests[i].seed for i, n in zip(members, sizes) for _ in range(n)]
        results = evaluate(first.model.cfg, params, first.tasks(), stats[members[0]], episodes=first.spec.episodes,
                           max_steps=first.spec.max_steps, seed=seeds, executor=first.spec.executor)
        offset = 0
        for i, n, c in zip(members, sizes, coeffs):
            r = requests[i]
            mode = r.model.metadata.get("checkpoint_mode", "last")
            out[i] = [Row(r.label, res.summary(offset + k), mode, r.checkpoint, ck or None)
                      for k, ck in enumerate(c) for res in results]
            offset += n
    return out


def run_lockstep(stages: Sequence[Generator], on_done: Callable[[int, Any], None] | None = None) -> list:
    """Run stages written as generators that yield `EvalRequest`s and are sent back each one's
    rows: every stage is advanced to its next request, all pending requests are evaluated
    together (`evaluate_requests`: compatible ones in one call), and so on until every stage has
    returned. Returns their return values in order; `on_done(i, value)` is called as stage i
    returns (e.g. to cache it). A stage alone runs exactly as it would with `evaluate_model`
    called inline."""
    out: list = [None] * len(stages)
    sent: dict[int, Any] = {i: None for i in range(len(stages))}
    while sent:
        pending = {}
        for i, rows in sent.items():
            try:
                req = stages[i].send(rows)
            except StopIteration as stop:
                out[i] = stop.value
                if on_done is not None:
                    on_done(i, stop.value)
                continue
            if not isinstance(req, EvalRequest):
                raise TypeError(f"run_lockstep: stage {i} yielded {type(req).__name__}, not an EvalRequest")
            pending[i] = req
        if not pending:
            break
        sent = dict(zip(pending, evaluate_requests(list(pending.values()))))
    return out


def _num_candidates(cfg: DTConfig, params) -> int | None:
    """None for one param set; M when every leaf has an extra leading axis of size M."""
    want = trees.shapes(param_shapes(cfg))
    got = trees.shapes(params)
    if set(want) != set(got):
        from mdt_jax.checkpoint import check_params
        check_params(cfg, params)  # raises, listing the paths
    if got == want:
        return None
    ms = {got[p][0] if len(got[p]) == len(w) + 1 and got[p][1:] == w else -1 for p, w in want.items()}
    if len(ms) != 1 or -1 in ms:
        bad = [p for p, w in want.items() if got[p] != w and got[p][1:] != w]
        raise ValueError(f"params do not fit the model config (expected shapes {'or a stacked leading axis'}); "
                         f"mismatched: {bad[:10]}")
    return ms.pop()


def _check_task_fits(cfg: DTConfig, task: envs.Task) -> int | None:
    """The task id routing a multi-task model, or None; errors if the dims don't fit."""
    if cfg.multi:
        return cfg.task_index(task.name)
    if (cfg.state_dim, cfg.act_dim) != (task.obs_dim, task.act_dim):
        raise ValueError(f"params are for (state_dim, act_dim) = ({cfg.state_dim}, {cfg.act_dim}) but task "
                         f"{task.name!r} has ({task.obs_dim}, {task.act_dim})")
    return None


def reset_states(task: envs.Task, episodes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (qpos, qvel) episode starts for a seed: episode e starts the same for every candidate."""
    env = envs.NativeBatchEnv(task, episodes, nthread=1)
    env.reset(np.random.default_rng([seed, zlib.crc32(task.name.encode())]))
    return env.state()


def bucket(n: int, cap: int) -> int:
    return min(cap, max(8, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def native_step(cfg, vmapped, params, cache: TokenCache, obs, rtg, t, task_id, n=None, order=None):
    """One policy step of the native loop: (actions (W, b, A), cache) for the stacked candidates'
    params (W, ...), their caches (W, b, 3K, ...) (donated), their normalised obs (W, E, S) and
    scaled rtg (W, E) (E >= b rows, `policy_step`). Row m is candidate m's; with `n` and `order`
    (traced, so nothing recompiles as candidates finish) only candidates order[:n] run, and the
    other rows' actions are zeros and their caches stale. A stack of one is padded to two
    (`_NativeDT`).

    One candidate at a time, in a loop whose trip count and indices XLA cannot see, over stacks of
    at least two: XLA:CPU runs vmap's batched (M, rows, in) x (M, in, out) dots ~1.5x slower than
    the 2-D ones, and this way a candidate's actions are bitwise the same whatever it is stacked
    with (a known trip count, or a stack of one, lets XLA simplify the loop and its indexing into a
    differently fused program, which differs in the last bits). So several seeds' candidates share
    one call and each gets what it gets alone. `vmapped` (candidates sharded over devices) keeps
    the vmap so that the candidate axis stays split.
    """
    step = lambda p, c, o, r: policy_step(cfg, p, c, t, o, r, task_id)
    if vmapped:
        return jax.vmap(step)(params, cache, obs, rtg)
    W = obs.shape[0]
    if W < 2 or jax.tree.leaves(params)[0].shape[0] < 2:
        raise ValueError("native_step: stack one candidate twice (see _NativeDT) and pass n=1")
    order = jnp.arange(W, dtype=jnp.int32) if order is None else order
    take = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)

    def body(i, carry):
        acts, cache = carry
        m = order[i]
        a, cache = policy_step(cfg, jax.tree.map(lambda x: take(x, m), params), cache, t, take(obs, m), take(rtg, m),
                               task_id, index=m)
        return jax.lax.dynamic_update_index_in_dim(acts, a, m, 0), cache

    acts = jnp.zeros((W, cache.x0.shape[1], cfg.act_dim), jnp.float32)
    return jax.lax.fori_loop(0, W if n is None else n, body, (acts, cache))


@jax.jit
def _take_rows(cache: TokenCache, rows) -> TokenCache:
    """cache[m, rows[m]] for every candidate m: rows (W, b') (a new episode order, and bucket; a
    new array: the input is not donated, its rows are fewer)."""
    return jax.tree.map(lambda x: jax.vmap(lambda c, r: c[r])(x, rows), cache)


class _NativeDT:
    """M candidates' DT as an `envs.EpisodePolicy` over M x E env slots (slot m * E + e is
    candidate m's episode e).

    The policy state is a `TokenCache` per episode, kept on the device and updated there by one
    jitted `native_step` per loop step; the host sends the step's observations (normalised) and
    return-to-go, and reads the actions back. Each candidate's cache rows hold its live episodes
    first (`perm`: the episode in each row); when episodes end, the rows are reordered once on the
    device and cut to the power-of-two bucket of the most live episodes of any candidate, so that
    a step runs on the live episodes only and the shapes (and compilations) stay few. A candidate
    whose episodes all ended costs nothing more. A finished episode keeps its last action."""

    def __init__(self, cfg: DTConfig, params, M: int, task: envs.Task, tid, stats: TaskStats, E: int, shard):
        self.cfg, self.params, self.M, self.E, self.task, self.shard = cfg, params, M, E, task, shard
        self.tid = jnp.int32(tid) if tid is not None else None
        self.mean, self.std = np.asarray(stats.state_mean, np.float32), np.asarray(stats.state_std, np.float32)
        self.rtg0, self.scale = stats.target_return / stats.rtg_scale, stats.rtg_scale
        self.cand = np.arange(M)[:, None]
        # one candidate runs as a stack of two, its copy never computed (`native_step`)
        self.W = M if shard else max(M, 2)
        if self.W > M:
            self.params = jax.tree.map(lambda x: jnp.concatenate([x, x]), params)

    def _put(self, x):
        """A host array (M, ...) as the step's input: padded to the stack, or split over devices."""
        if self.W > self.M:
            x = np.concatenate([x, x[:self.W - self.M]])
        return jax.device_put(x, self.shard) if self.shard else x

    def reset(self, n: int) -> None:
        M, E = self.M, self.E
        self.perm = np.tile(np.arange(E), (M, 1))  # the episode held by each cache row
        self.n_live = np.full(M, E)
        cache = TokenCache.zeros((self.W, E), self.cfg)
        self.cache = jax.device_put(cache, self.shard) if self.shard else cache
        self.rtg = np.full((M, E), self.rtg0, np.float32)
        self.actions = np.zeros((M, E, self.task.act_dim))

    def _compact(self, live: np.ndarray, n_live: np.ndarray) -> None:
        """Reorder every candidate's rows so that its live episodes come first (in their order),
        and cut the cache to the bucket of the most live episodes."""
        b_old, b = self.cache.x0.shape[1], bucket(int(n_live.max()), self.E)
        rows = np.argsort(~live[self.cand, self.perm], axis=1, kind="stable")  # live rows first
        self.perm = self.perm[self.cand, rows]
        self.cache = _take_rows(self.cache, self._put(np.minimum(rows[:, :b], b_old - 1).astype(np.int32)))
        self.n_live = n_live

    def __call__(self, obs, t, live):
        M, cand = self.M, self.cand
        live = live.reshape(M, self.E)
        n_live = live.sum(1)
        if (n_live != self.n_live).any():
            self._compact(live, n_live)
        obs = ((obs.reshape(M, self.E, -1)[cand, self.perm] - self.mean) / self.std).astype(np.float32)
        rtg = self.rtg[cand, self.perm]
        if self.shard:  # every candidate, vmapped over the devices
            run = np.arange(M)
            a, self.cache = native_step(self.cfg, True, self.params, self.cache, self._put(obs), self._put(rtg),
                                        np.int32(t), self.tid)
        else:  # the candidates with live episodes first; a stack of one padded to two
            run = np.flatnonzero(n_live > 0)
            order = np.concatenate([run, np.flatnonzero(n_live == 0), np.zeros(self.W - M, np.int64)])
            a, self.cache = native_step(self.cfg, False, self.params, self.cache, self._put(obs), self._put(rtg),
                                        np.int32(t), self.tid, np.int32(len(run)), order.astype(np.int32))
        a = np.asarray(a)[run]
        rows = np.nonzero(np.arange(a.shape[1])[None] < n_live[run][:, None])
        self.actions[run[rows[0]], self.perm[run][rows]] = a[..., :self.task.act_dim][rows]
        return self.actions.reshape(M * self.E, -1)

    def observe(self, reward) -> None:
        self.rtg = self.rtg - (reward.reshape(self.M, self.E) / self.scale).astype(np.float32)


def _starts(task: envs.Task, episodes: int, seeds: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(qpos, qvel), each (M, E, ...): candidate m's episode starts from reset seed seeds[m]."""
    once = {s: reset_states(task, episodes, s) for s in dict.fromkeys(seeds)}
    return tuple(np.stack([once[s][i] for s in seeds]) for i in range(2))


def _evaluate_native(cfg, params, M, task, tid, stats: TaskStats, episodes, max_steps, seeds, progress, mesh=None):
    E = episodes
    if shard := sharding.candidate_sharding(mesh, M):  # the policy's candidates split over devices
        params = jax.device_put(params, shard)
    out = envs.run_episodes(envs.NativeBatchEnv(task, M * E), _NativeDT(cfg, params, M, task, tid, stats, E, shard),
                            starts=tuple(x.reshape(M * E, -1) for x in _starts(task, E, seeds)),
                            max_steps=max_steps, progress=progress)
    return out.returns.reshape(M, E), out.lengths.reshape(M, E), out.nan_actions.reshape(M, E)


def _evaluate_mjx(cfg, params, M, task, tid, stats: TaskStats, episodes, max_steps, seeds, progress, mesh=None):
    from mdt_jax.envs.mjx import MjxEnv

    env = MjxEnv(task)
    E = episodes
    mean, std = jnp.asarray(stats.state_mean, jnp.float32), jnp.asarray(stats.state_std, jnp.float32)

    def episode(p, starts):  # one candidate's episodes from starts = (qpos, qvel), each (E, ...)
        E = starts[0].shape[0]
        st = jax.vmap(env.init_state)(*starts)
        cache = TokenCache.zeros(E, cfg)
        rtg0 = jnp.full((E,), stats.target_return / stats.rtg_scale, jnp.float32)
        zeros = jnp.zeros((E,))

        def body(carry, t):
            st, cache, rtg, done, ret, length, nan = carry
            a, cache = policy_step(cfg, p, cache, t, (st.obs - mean) / std, rtg, tid)
            st = jax.vmap(env.step)(st, a[:, :task.act_dim])
            live = ~done
            ret = ret + jnp.where(live, st.reward, 0.0)
            length = length + live
            nan = nan + (live & st.info["nan_action"])
            done = done | (st.done > 0)
            return (st, cache, rtg - st.reward / stats.rtg_scale, done, ret, length, nan), None

        init = (st, cache, rtg0, jnp.zeros((E,), bool), zeros, zeros.astype(jnp.int32), zeros.astype(jnp.int32))
        (_, _, _, _, ret, length, nan), _ = jax.lax.scan(body, init, jnp.arange(max_steps))
        return ret, length, nan

    shared = len(set(seeds)) == 1  # every candidate from the same starts: not copied M times
    starts = reset_states(task, E, seeds[0]) if shared else _starts(task, E, seeds)
    starts = tuple(jnp.asarray(x, jnp.float32) for x in starts)
    out = sharding.split_rollouts(jax.vmap(episode, in_axes=(0, None if shared else 0)), mesh, params, starts,
                                  per_candidate=not shared)
    if progress is not None:
        progress(int(out[1].sum()))
    return out


def evaluate(cfg: DTConfig, params, tasks: Sequence[str], stats: dict[str, TaskStats], *, episodes: int = 50,
             max_steps: int = 1000, seed: int | Sequence[int] = 0, executor: str = "auto",
             progress: Callable[[int], None] | None = None, mesh=None) -> list[TaskResult]:
    """Evaluate one param set, or M stacked on a leading axis, on every task in `tasks`.

    `stats[task]` gives the normalisation and target. With one reset `seed`, every candidate sees
    the same episode starts; with M seeds (one per candidate), candidate m sees seed[m]'s, the
    starts it gets when evaluated alone on that seed (several seeds' candidates in one call).
    `progress(n)` is called with the number of env steps just taken. Returns one TaskResult per task,
    arrays shaped (M, episodes) (M = 1 for a single param set).

    `mesh` (`mdt_jax.sharding`) splits the work over its devices: with mjx, the candidates when M
    divides the mesh, else the episodes; with native, the policy's candidates when M divides the
    mesh (physics stays on this host, so a native mesh must be this host's devices).
    """
    if not isinstance(episodes, int) or episodes <= 0:
        raise ValueError(f"episodes must be a positive int, got {episodes!r}")
    if not isinstance(max_steps, int) or max_steps <= 0:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if not tasks:
        raise ValueError("no tasks to evaluate")
    M = _num_candidates(cfg, params)
    stacked = params if M is not None else jax.tree.map(lambda x: jnp.asarray(x)[None], params)
    M = M or 1
    seeds = _check_seeds(seed, M)
    stacked = jax.tree.map(jnp.asarray, stacked)
    executor = envs.resolve_executor(executor)
    run = _evaluate_native if executor == "native" else _evaluate_mjx
    if executor == "native" and mesh is not None and mesh.is_multi_process:
        raise ValueError("evaluate: the native executor runs on one host; give it a mesh of this host's "
                         "devices (sharding.data_mesh(jax.local_devices())) or use executor='mjx'")
    results = []
    for name in tasks:
        task = envs.get_task(name)
        tid = _check_task_fits(cfg, task)
        if name not in stats:
            raise ValueError(f"no normalisation stats for task {name!r} (have {sorted(stats)})")
        st = stats[name]
        if np.shape(st.state_mean) != (task.obs_dim,) or np.shape(st.state_std) != (task.obs_dim,):
            raise ValueError(f"stats[{name!r}]: state_mean/state_std must have shape ({task.obs_dim},)")
        ret, length, nan = run(cfg, stacked, M, task, tid, st, episodes, max_steps, seeds, progress, mesh)
        results.append(TaskResult(name, np.asarray(ret, np.float64), np.asarray(length), np.asarray(nan),
                                  st.target_return))
    return results


def _check_seeds(seed, M: int) -> tuple[int, ...]:
    """One reset seed per candidate, from an int (all the same) or a sequence of M ints."""
    ok = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0
    if ok(seed):
        return (int(seed),) * M
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence) and not isinstance(seed, np.ndarray):
        raise ValueError(f"seed: a non-negative int or one per candidate, got {seed!r}")
    seeds = tuple(seed)
    if len(seeds) != M or not all(map(ok, seeds)):
        raise ValueError(f"seed: {M} non-negative int(s), one per candidate, got {seeds!r}")
    return tuple(map(int, seeds))


class _History:
    """The original protocol's policy state as an `envs.EpisodePolicy` on one env slot: the
    episode's growing history of states, actions, rtg and timesteps, its last K steps given to
    `policy(states, actions, rtg, timesteps, mask) -> (1, K, A)` left-padded with zeros."""

    def __init__(self, cfg: DTConfig, task: envs.Task, stats: TaskStats, policy: Callable):
        self.cfg, self.task, self.policy = cfg, task, policy
        self.mean, self.std = np.asarray(stats.state_mean), np.asarray(stats.state_std)
        self.rtg0, self.scale = stats.target_return / stats.rtg_scale, stats.rtg_scale

    def reset(self, n: int) -> None:
        if n != 1:
            raise ValueError(f"the sequential protocol runs one episode at a time, got {n} slots")
        self.states, self.rtg, self.ts = [], [self.rtg0], []
        self.actions = np.zeros((0, self.cfg.act_dim), np.float32)

    def __call__(self, obs, t, live):
        cfg, K = self.cfg, self.cfg.context_len
        self.states.append(obs[0])
        self.ts.append(t)
        self.actions = np.concatenate([self.actions, np.zeros((1, cfg.act_dim), np.float32)])
        s = ((np.asarray(self.states[-K:]) - self.mean) / self.std).astype(np.float32)
        s = np.pad(s, ((0, 0), (0, cfg.state_dim - self.task.obs_dim)))
        a, r_ = self.actions[-K:], np.asarray(self.rtg[-K:], np.float32)[:, None]
        tt = np.asarray(self.ts[-K:], np.int32)
        L = len(s)
        pad = lambda x: np.concatenate([np.zeros((K - L,) + x.shape[1:], x.dtype), x])[None]
        mask = np.concatenate([np.zeros(K - L), np.ones(L)]).astype(np.float32)[None]
        act = self.policy(pad(s), pad(a), pad(r_), pad(np.minimum(tt, cfg.max_ep_len - 1)), mask)[0, -1]
        self.actions[-1] = act
        return act[None, :self.task.act_dim]

    def observe(self, reward) -> None:
        self.rtg.append(self.rtg[-1] - float(reward[0]) / self.scale)


def evaluate_sequential(cfg: DTConfig, params, task: str, stats: TaskStats, *, episodes: int = 1,
                        max_steps: int = 1000, seed: int = 0, policy: Callable | None = None) -> TaskResult:
    """The original protocol: one episode at a time, batch 1, growing history cut to the last K.

    `policy(states, actions, rtg, timesteps, mask) -> (1, K, A)` defaults to our jitted DT; the
    benchmark plugs transformers' PyTorch DT in here.
    """
    task = envs.get_task(task)
    tid = _check_task_fits(cfg, task)
    if policy is None:
        fwd = jax.jit(lambda s, a, r, t, m: apply(cfg, params, s, a, r, t, m,
                                                  None if tid is None else jnp.full((1,), tid)))
        policy = lambda *x: np.asarray(fwd(*x))
    qpos, qvel = reset_states(task, episodes, seed)
    env = envs.NativeBatchEnv(task, 1, nthread=1)
    history = _History(cfg, task, stats, policy)
    runs = [envs.run_episodes(env, history, starts=(qpos[e:e + 1], qvel[e:e + 1]), max_steps=max_steps)
            for e in range(episodes)]
    field = lambda f: np.asarray([[getattr(r, f)[0] for r in runs]])
    return TaskResult(task.name, field("returns"), field("lengths"), field("nan_actions"), stats.target_return)


def evaluate_checkpoint(path: str, tasks=(), *, episodes: int = 10, max_steps: int = 1000, seed: int = 0,
                        executor: str = "auto", target_return: float = 0.0, progress: bool = True) -> dict:
    """Evaluate the DT checkpoint at `path` on `tasks` (default: its own) with its own normalisers;
    `target_return` 0 takes each task's paper target. Returns the eval.json report: per-task
    summaries, every episode's return and length, the executor, the wall time."""
    import time

    from tqdm import tqdm

    from mdt_jax import checkpoint

    if not path:
        raise ValueError("config.checkpoint: no checkpoint given")
    if target_return < 0:
        raise ValueError(f"config.target_return: must be >= 0, got {target_return}")
    model = checkpoint.load(path)
    if not model.norms:
        raise ValueError(f"config.checkpoint: {path} has no normalisation stats (not a trained DT policy)")
    tasks = list(tasks) or (list(model.cfg.task_names) if model.cfg.multi else [model.metadata.get("task")])
    stats = model_stats(model, tasks, target_return)
    bar = tqdm(total=episodes * max_steps * len(tasks), unit="env-step", unit_scale=True, desc="evaluate",
               dynamic_ncols=True, disable=not progress)
    t0 = time.perf_counter()
    results = evaluate(model.cfg, model.params, tasks, stats, episodes=episodes, max_steps=max_steps, seed=seed,
                       executor=executor, progress=bar.update)
    bar.close()
    return {"checkpoint": os.path.abspath(path), "executor": envs.resolve_executor(executor), "seed": seed,
            "wall_s": time.perf_counter() - t0, "env_steps": int(sum(r.lengths.sum() for r in results)),
            "results": [r.summary() for r in results],
            "episodes": {r.task: {"returns": r.returns[0].tolist(), "lengths": r.lengths[0].tolist()}
                         for r in results}}
