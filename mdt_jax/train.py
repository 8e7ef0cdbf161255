"""Training: a pure `train_step`, N steps fused in one `lax.scan`, vmappable over seeds/hparams/tasks.

The optimizer is the reference's: AdamW (torch semantics, decay on every trainable tensor except
those matched by `TrainConfig.no_decay`),
a linear warmup ``lr * min((step + 1) / warmup, 1)``, and global-norm clipping with torch's
``max_norm / (norm + 1e-6)`` rule. Hyperparameters that a sweep varies (learning rate, weight
decay, init_reg) live as arrays in `TrainState.hparams`, so `jax.vmap` over a stacked state
trains several models in one call. Frozen params (path patterns, see `mdt_jax.subsets`) get no
gradient, no decay and do not count towards the clipping norm, as with torch's
``requires_grad=False``.

The RNG of step ``s`` is ``fold_in(state.rng, s)``, so a run resumed from any checkpoint
reproduces the uninterrupted run bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdt_jax import sharding, subsets
from mdt_jax.models.dt import DTConfig, apply, init_params

HPARAMS = ("learning_rate", "weight_decay", "init_reg")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64            # per task for multi-task models
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 10_000
    grad_clip: float = 0.25
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    init_reg: float = 0.0           # c in c * sum_tensors ||theta - theta_init||_2 over `init_reg_on`
    init_reg_on: tuple[str, ...] = ("blocks",)
    freeze: tuple[str, ...] = ()    # path patterns / aliases of params kept fixed
    # path patterns / aliases that get no weight decay; the reference's P2 finetunes
    # (`--custom_transformer_decay`) exempt the GPT-2 trunk: ("blocks", "ln_f"), with adam_eps 1e-6
    no_decay: tuple[str, ...] = ()

    def __post_init__(self):
        for f in ("batch_size", "warmup_steps"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TrainConfig.{f}: must be a positive int, got {v!r}")
        for f in ("learning_rate", "weight_decay", "grad_clip", "init_reg", "adam_eps"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"TrainConfig.{f}: must be a finite number >= 0, got {v!r}")
        for f in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f}: must be in [0, 1), got {getattr(self, f)!r}")
        object.__setattr__(self, "freeze", tuple(subsets.pattern_names(self.freeze)))
        object.__setattr__(self, "init_reg_on", tuple(subsets.pattern_names(self.init_reg_on)))
        object.__setattr__(self, "no_decay", tuple(subsets.pattern_names(self.no_decay)))


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array           # raw uint32 key data (checkpointable)
    hparams: dict            # {'learning_rate','weight_decay','init_reg'}: float32 scalars
    anchor: dict             # {flat path: value at init} of the init_reg tensors; {} when off


def _key(raw):
    return jax.random.wrap_key_data(raw)


def _optimizer(tcfg: TrainConfig, hp: dict, step) -> optax.GradientTransformation:
    lr = hp["learning_rate"] * jnp.minimum((step + 1.0) / tcfg.warmup_steps, 1.0)
    decay = None
    if tcfg.no_decay:
        decay = lambda params: jax.tree.map(lambda x: not x, subsets.select(params, tcfg.no_decay))
    return optax.chain(optax.scale_by_adam(tcfg.adam_b1, tcfg.adam_b2, tcfg.adam_eps),
                       optax.add_decayed_weights(hp["weight_decay"], mask=decay), optax.scale(-lr))


def trainable_mask(params, tcfg: TrainConfig):
    if not tcfg.freeze:
        return jax.tree.map(lambda _: True, params)
    frozen = subsets.select(params, tcfg.freeze)
    return jax.tree.map(lambda f: not f, frozen)


def init_state(cfg: DTConfig, tcfg: TrainConfig, rng: jax.Array, params=None, **hparams) -> TrainState:
    """A fresh TrainState. `params` defaults to a new init from `rng`; `hparams` override the config.

    Vmappable over `rng`/`params`/hparams: ``jax.vmap(lambda r: init_state(cfg, tcfg, r))(keys)``.
    """
    init_key, run_key = jax.random.split(rng)
    if params is None:
        params = init_params(cfg, init_key)
    hp = {k: jnp.asarray(hparams.get(k, getattr(tcfg, k)), jnp.float32) for k in HPARAMS}
    unknown = set(hparams) - set(HPARAMS)
    if unknown:
        raise ValueError(f"unknown hparams {sorted(unknown)}; vmappable hparams are {HPARAMS}")
    anchor = {}
    if tcfg.init_reg > 0 or "init_reg" in hparams:
        reg = subsets.select(params, tcfg.init_reg_on)
        anchor = {k: jnp.copy(v) for k, v in _flat(params).items() if _flat(reg)[k]}
    opt_state = _optimizer(tcfg, hp, 0).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(run_key), hparams=hp, anchor=anchor)


def init_params_for_seed(cfg: DTConfig, seed: int) -> dict:
    """The params `init_state(cfg, tcfg, jax.random.key(seed))` starts from. Flax draws each module's
    init from the key and its path, so two configs given the same seed share every same-shaped param
    (a common init for DTs of tasks with different state/action dims)."""
    return init_params(cfg, jax.random.split(jax.random.key(seed))[0])


def _safe_norm(x):
    """||x||_2 with gradient 0 (not NaN) at x = 0, like torch's norm backward."""
    sq = jnp.sum(jnp.square(x))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def act_dims(cfg: DTConfig, batch: dict) -> jax.Array:
    """Per-sample number of real action dims: (B,) for multi-task, else a scalar."""
    if cfg.multi:
        return jnp.asarray([t.act_dim for t in cfg.tasks], jnp.int32)[batch["task_id"]]
    return jnp.asarray(batch.get("act_dim", cfg.act_dim), jnp.int32)


def action_loss(cfg: DTConfig, params, batch: dict, rng: jax.Array | None = None) -> jax.Array:
    """Masked action MSE (reference: mean over unmasked steps x action dims).

    Multi-task: the sum over tasks of each task's own masked mean (the reference's summed
    per-task losses). `batch['act_dim']` (scalar) masks padded action dims of a single-task model
    trained on padded data (vmap over tasks).
    """
    preds = apply(cfg, params, batch["states"], batch["actions"], batch["rtg"], batch["timesteps"],
                  batch["mask"], batch.get("task_id"), rng=rng)
    A = preds.shape[-1]
    dims = act_dims(cfg, batch)
    dim_ok = (jnp.arange(A) < jnp.reshape(dims, (-1, 1, 1))).astype(preds.dtype)
    valid = batch["mask"][..., None].astype(preds.dtype) * dim_ok
    err = jnp.square(preds - batch["actions"]) * valid
    if not cfg.multi:
        return jnp.sum(err) / jnp.maximum(jnp.sum(valid), 1.0)
    onehot = jax.nn.one_hot(batch["task_id"], len(cfg.tasks), dtype=preds.dtype)
    sums = jnp.einsum("bka,bt->t", err, onehot)
    counts = jnp.einsum("bka,bt->t", valid * jnp.ones_like(err), onehot)
    return jnp.sum(jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0))


def _flat(tree) -> dict:
    """{'block_0.attn.c_attn.kernel': leaf}: flat keys orbax can store."""
    return {subsets.path_str(p).replace("/", "."): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def init_reg_loss(state: TrainState, params) -> jax.Array:
    """c * sum over the anchored tensors of ||theta - theta_init||_2 (unsquared)."""
    flat = _flat(params)
    terms = [_safe_norm(flat[k] - a) for k, a in state.anchor.items()]
    return state.hparams["init_reg"] * sum(terms) if terms else jnp.zeros(())


AuxLoss = Callable[[Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


def make_train_step(cfg: DTConfig, tcfg: TrainConfig, sample: Callable[[Any, jax.Array], dict],
                    aux_loss: AuxLoss | None = None):
    """Returns pure `step(state, data) -> (state, metrics)`; `sample(data, key) -> batch`.

    `aux_loss(params, batch, step, key) -> (scalar, {name: scalar})`, if given, is added to the
    loss inside the step (`step` is the number of updates already applied; `key` is
    ``fold_in(step key, 1)``, apart from the data and dropout keys); its value is logged as
    ``aux_loss`` and its metrics under their own names.
    """

    def step(state: TrainState, data) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(_key(state.rng), state.step)
        data_key, drop_key = jax.random.split(key)
        batch = sample(data, data_key)
        train = trainable_mask(state.params, tcfg)

        def loss_fn(params):
            act = action_loss(cfg, params, batch, drop_key)
            reg = init_reg_loss(state, params) if state.anchor else jnp.zeros(())
            if aux_loss is None:
                return act + reg, (act, reg, {})
            aux, aux_metrics = aux_loss(params, batch, state.step, jax.random.fold_in(key, 1))
            return act + reg + aux, (act, reg, {"aux_loss": aux, **aux_metrics})

        (loss, (act, reg, aux_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, train)
        gnorm = optax.tree.norm(grads)
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, tcfg.grad_clip / (gnorm + 1e-6)), grads)
        opt = _optimizer(tcfg, state.hparams, state.step)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u, t: u if t else jnp.zeros_like(u), updates, train)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "action_mse": act, "init_reg": reg, "grad_norm": gnorm,
                   "lr": state.hparams["learning_rate"] * jnp.minimum((state.step + 1.0) / tcfg.warmup_steps, 1.0),
                   **aux_metrics}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def make_train_chunk(cfg: DTConfig, tcfg: TrainConfig, sample: Callable, *, vmapped: bool = False,
                     mesh: jax.sharding.Mesh | None = None, aux_loss: AuxLoss | None = None):
    """jit(`chunk(state, data, n) -> (state, metrics)`): n steps in one lax.scan, state donated.

    With `vmapped`, state and data carry a leading model axis (seeds, hparams or tasks) and every
    model is trained in the same call. With a `mesh` (`mdt_jax.sharding`), training is data
    parallel: state and data are replicated over it and each sampled batch is split across its
    devices on the batch axis (which the device count must divide). `aux_loss`: see `make_train_step`.
    """
    step = make_train_step(cfg, tcfg, sharding.sharded_sampler(sample, mesh), aux_loss)

    def chunk(state, data, n):
        def body(s, _):
            return step(s, data)
        state, metrics = jax.lax.scan(body, state, None, length=n)
        return state, jax.tree.map(jnp.mean, metrics) | {"last_loss": metrics["loss"][-1]}

    if vmapped:
        chunk = jax.vmap(chunk, in_axes=(0, 0, None))
    if mesh is not None:
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.jit(chunk, static_argnums=2, donate_argnums=0, in_shardings=(rep, rep), out_shardings=rep)
    return jax.jit(chunk, static_argnums=2, donate_argnums=0)


def default_sampler(cfg: DTConfig, tcfg: TrainConfig) -> Callable:
    """The on-device segment sampler matching the model: single- or multi-task."""
    from mdt_jax.data import sampler as S

    if cfg.multi:
        return lambda data, key: S.sample_multitask(data, key, tcfg.batch_size)
    return lambda data, key: S.sample_batch(data, key, tcfg.batch_size)


# ----------------------------------------------------------------------------------------------
# The driver: checkpoints, resume, metrics, progress. Side effects live here only.
# ----------------------------------------------------------------------------------------------

def fit(cfg: DTConfig, tcfg: TrainConfig, data, *, num_steps: int, workdir: str, seed: int = 0,
        params=None, steps_per_call: int = 100, checkpoint_every: int = 1000, log_every: int | None = None,
        sample: Callable | None = None, progress: bool = True, stop_after: int | None = None,
        init: Callable[[], TrainState] | None = None, vmapped: bool = False, desc: str = "train",
        mesh: jax.sharding.Mesh | None = None, aux_loss: AuxLoss | None = None, eval_every: int = 0,
        on_eval: Callable[[int, Any], None] | None = None) -> TrainState:
    """Train for `num_steps` with checkpoints in `workdir/checkpoints`, resuming from the latest.

    Metrics go to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tb`. `stop_after`
    stops early after that many steps of this call (used to test interruption). `init()` builds
    the initial state instead of `init_state(cfg, tcfg, key(seed), params)`; with `vmapped`, it
    returns states stacked on a leading model axis, `data` is stacked likewise, and every model
    trains in the same call (logged metrics are means over models). With a `mesh`, training is data
    parallel over its devices (`make_train_chunk`); across hosts, every host runs `fit` alike,
    `workdir` is on a filesystem they share, and only process 0 writes metrics. `aux_loss` is added
    to every step's loss (`make_train_step`).

    With `eval_every` > 0, `on_eval(step, params)` is called every `eval_every` steps (chunks end
    there) and at the end; it keeps whatever it wants (e.g. the best checkpoint by a score on
    selection episodes, `mdt_jax.run`), so side effects stay outside the pure core.
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from mdt_jax.metrics import MetricWriter

    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if steps_per_call <= 0 or checkpoint_every <= 0:
        raise ValueError("steps_per_call and checkpoint_every must be positive")
    log_every = log_every or steps_per_call
    sample = sample or default_sampler(cfg, tcfg)
    chunk = make_train_chunk(cfg, tcfg, sample, vmapped=vmapped, mesh=mesh, aux_loss=aux_loss)
    init = init or (lambda: init_state(cfg, tcfg, jax.random.key(seed), params))
    os.makedirs(workdir, exist_ok=True)
    mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                                      enable_async_checkpointing=False))
    latest = mngr.latest_step()
    if latest is not None:
        template = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), jax.eval_shape(init))
        state = mngr.restore(latest, args=ocp.args.StandardRestore(template))
        state = jax.tree.map(jnp.asarray, state)
    else:
        state = init()
    if mesh is not None:
        state, data = sharding.put((state, data), mesh)
    start = int(np.max(state.step))
    primary = jax.process_index() == 0
    writer = MetricWriter(workdir, truncate_after=start) if primary else None
    bar = tqdm(total=num_steps, initial=start, disable=not (progress and primary), unit="step",
               dynamic_ncols=True, desc=desc)
    end = num_steps if stop_after is None else min(num_steps, start + stop_after)
    step = start
    t0, s0 = time.perf_counter(), step
    try:
        while step < end:
            # chunks end on multiples of steps_per_call and checkpoint_every, so a resumed run
            # takes the same sequence of steps as an uninterrupted one
            nxt = min(end, (step // steps_per_call + 1) * steps_per_call,
                      (step // checkpoint_every + 1) * checkpoint_every,
                      (step // eval_every + 1) * eval_every if eval_every > 0 else end)
            state, metrics = chunk(state, data, nxt - step)
            bar.update(nxt - step)
            step = nxt
            m = {k: float(jnp.mean(v)) for k, v in metrics.items()}
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"loss became {m['loss']} at step {step}; last checkpoint kept")
            rate = (step - s0) / max(time.perf_counter() - t0, 1e-9)
            if writer and (step % log_every == 0 or step == end):
                writer.write(step, m | {"steps_per_s": rate})
            bar.set_postfix(loss=f"{m['loss']:.4f}", sps=f"{rate:.1f}")
            if on_eval is not None and eval_every > 0 and (step % eval_every == 0 or step == num_steps):
                on_eval(step, state.params)  # before the checkpoint: a kill between them re-evaluates
            if step % checkpoint_every == 0 or step == num_steps:
                mngr.save(step, args=ocp.args.StandardSave(state))
                mngr.wait_until_finished()
    finally:
        bar.close()
        if writer:
            writer.close()
        mngr.close()
    return state


def run_config_guard(workdir: str, run_config: dict) -> None:
    """Refuse to reuse a workdir that holds a different run's config; record ours otherwise."""
    path = os.path.join(workdir, "run_config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != run_config:
            diff = sorted(k for k in set(old) | set(run_config) if old.get(k) != run_config.get(k))
            raise FileExistsError(f"workdir {workdir} holds a different run (differs in {diff}); "
                                  "use a new --workdir")
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(run_config, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
