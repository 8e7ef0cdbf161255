"""Training: a pure `train_step`, N steps fused in one `lax.scan`, vmappable over seeds/hparams/tasks.

The optimizer is the reference's, built once per `TrainConfig` by `optimizer(tcfg)` as one optax
chain: global-norm clipping with torch's rule ``g * min(1, max_norm / (norm + 1e-6))``
(`torch.nn.utils.clip_grad_norm_`), Adam, decoupled weight decay on every trainable tensor except
those matched by `TrainConfig.no_decay` (AdamW, torch semantics), and the learning rate with a
linear warmup ``lr * min((count + 1) / warmup, 1)`` (`lr_schedule`; ``count`` is the number of
updates applied before this one). Frozen params (path patterns, see `mdt_jax.subsets`) are a
separate `optax.partition` group that gets zero updates, so they get no decay and their gradients
do not count towards the clipping norm, as with torch's ``requires_grad=False``.

The learning rate and weight decay are `optax.inject_hyperparams`, so they are arrays in the
optimizer state (``opt_state.hyperparams``: the learning rate of the latest update and the weight
decay; the warmup's peak is ``opt_state.hyperparams_states['learning_rate'].peak``), and init_reg
is an array in `TrainState.hparams`. A sweep sets them per model in `init_state`, and `jax.vmap`
over the stacked states trains several models in one call. The logged ``lr`` and ``grad_norm``
are read from the optimizer state, so they are the values the update used.

The RNG of step ``s`` is ``fold_in(state.rng, s)``, so a run resumed from any checkpoint
reproduces the uninterrupted run bit for bit. A checkpoint whose state tree differs from the one
this code builds (e.g. one written before the optimizer became one chain) is refused by `fit`
with a ValueError, not restored into the wrong slots.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mdt_jax import sharding, subsets, trees
from mdt_jax.fileio import run_config_guard  # noqa: F401  (re-exported)
from mdt_jax.losses import act_dims, action_loss, init_reg  # noqa: F401  (action_loss re-exported)
from mdt_jax.models.dt import DTConfig, init_params

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
    hparams: dict            # {'init_reg': float32 scalar}; learning rate and weight decay: opt_state
    anchor: dict             # {flat path: value at init} of the init_reg tensors; {} when off


def _key(raw):
    return jax.random.wrap_key_data(raw)


class WarmupState(NamedTuple):
    count: jax.Array   # int32: updates applied
    peak: jax.Array    # float32: the learning rate after warmup (per model in a sweep)


class LinearWarmup:
    """The reference's warmup as an optax stateful schedule: ``peak * min((count + 1) / warmup, 1)``.

    The peak lives in the schedule's state (not in a closure), so one optimizer serves every model
    of a vmapped sweep, each with its own peak.
    """

    def __init__(self, peak: float, warmup_steps: int):
        self.peak, self.warmup_steps = peak, warmup_steps

    def init(self) -> WarmupState:
        return WarmupState(count=jnp.zeros((), jnp.int32), peak=jnp.asarray(self.peak, jnp.float32))

    def update(self, state: WarmupState, **extra_args) -> WarmupState:
        return state._replace(count=optax.safe_increment(state.count))

    def __call__(self, state: WarmupState, **extra_args) -> jax.Array:
        return state.peak * jnp.minimum((state.count + 1.0) / self.warmup_steps, 1.0)


def lr_schedule(tcfg: TrainConfig) -> LinearWarmup:
    """The learning-rate schedule of `optimizer(tcfg)`: linear warmup to `tcfg.learning_rate`."""
    return LinearWarmup(tcfg.learning_rate, tcfg.warmup_steps)


class ClipState(NamedTuple):
    grad_norm: jax.Array   # global norm of the latest update's (trainable) gradients, before clipping


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch's ``clip_grad_norm_``: ``g * min(1, max_norm / (||g||_2 + 1e-6))`` over the tree it sees.

    (optax's `clip_by_global_norm` scales by ``max_norm / norm`` without the 1e-6.) The norm is kept
    in the state: it is the ``grad_norm`` metric.
    """

    def init(params):
        del params
        return ClipState(jnp.zeros((), jnp.float32))

    def update(updates, state, params=None):
        del params, state
        norm = jnp.asarray(optax.tree.norm(updates), jnp.float32)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda g: g * scale, updates), ClipState(norm)

    return optax.GradientTransformation(init, update)


def trainable_mask(params, tcfg: TrainConfig):
    """A bool tree: False on the params matched by `tcfg.freeze`."""
    if not tcfg.freeze:
        return jax.tree.map(lambda _: True, params)
    frozen = subsets.select(params, tcfg.freeze)
    return jax.tree.map(lambda f: not f, frozen)


def optimizer(tcfg: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The training optimizer: clip (trainable grads) -> Adam -> decay (masked) -> -lr; frozen -> 0.

    Built once; ``update`` needs `params` (weight decay). Hyperparams: ``learning_rate`` (scheduled
    by `lr_schedule`) and ``weight_decay``, set per model by `init_state`.
    """

    def labels(params):
        if tcfg.no_decay:
            subsets.select(params, tcfg.no_decay)  # a pattern matching nothing is a ValueError
        return jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, tcfg))

    def decay_mask(params):  # `params` holds the trainable leaves only (frozen: MaskedNode)
        return jax.tree.map(lambda x: not x, subsets.select(params, tcfg.no_decay, strict=False))

    def chain(learning_rate, weight_decay):
        train = optax.chain(clip_by_global_norm_torch(tcfg.grad_clip),
                            optax.scale_by_adam(tcfg.adam_b1, tcfg.adam_b2, tcfg.adam_eps),
                            optax.add_decayed_weights(weight_decay, mask=decay_mask if tcfg.no_decay else None),
                            optax.scale(-learning_rate))
        return optax.partition({"train": train, "frozen": optax.set_to_zero()}, labels)

    # float32 hyperparams whatever the params' dtype (inject_hyperparams would follow the params')
    return optax.inject_hyperparams(chain, hyperparam_dtype=jnp.float32)(
        learning_rate=lr_schedule(tcfg), weight_decay=tcfg.weight_decay)


def _with_hparams(tcfg: TrainConfig, opt_state, learning_rate: jax.Array, weight_decay: jax.Array):
    """`opt_state` with this model's peak learning rate and weight decay."""
    sched = opt_state.hyperparams_states["learning_rate"]._replace(peak=learning_rate)
    return opt_state._replace(
        hyperparams={**opt_state.hyperparams, "learning_rate": lr_schedule(tcfg)(sched), "weight_decay": weight_decay},
        hyperparams_states={**opt_state.hyperparams_states, "learning_rate": sched})


def learning_rate(opt_state) -> jax.Array:
    """The learning rate of the latest update (at init: of the first)."""
    return opt_state.hyperparams["learning_rate"]


def grad_norm(opt_state) -> jax.Array:
    """The latest update's global norm of the trainable gradients, before clipping (0 at init)."""
    return optax.tree_utils.tree_get(opt_state, "grad_norm")


def init_state(cfg: DTConfig, tcfg: TrainConfig, rng: jax.Array, params=None, **hparams) -> TrainState:
    """A fresh TrainState. `params` defaults to a new init from `rng`; `hparams` (learning_rate,
    weight_decay, init_reg) override the config's for this model.

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
    opt_state = _with_hparams(tcfg, optimizer(tcfg).init(params), hp["learning_rate"], hp["weight_decay"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(run_key), hparams={"init_reg": hp["init_reg"]}, anchor=anchor)


def init_params_for_seed(cfg: DTConfig, seed: int) -> dict:
    """The params `init_state(cfg, tcfg, jax.random.key(seed))` starts from. Flax draws each module's
    init from the key and its path, so two configs given the same seed share every same-shaped param
    (a common init for DTs of tasks with different state/action dims)."""
    return init_params(cfg, jax.random.split(jax.random.key(seed))[0])


def _flat(tree) -> dict:
    """{'block_0.attn.c_attn.kernel': leaf}: flat keys orbax can store."""
    return trees.flatten(tree, sep=".")


def init_reg_loss(state: TrainState, params) -> jax.Array:
    """c * sum over the anchored tensors of ||theta - theta_init||_2 (unsquared; `losses.init_reg`)."""
    return init_reg(state.anchor, state.hparams["init_reg"], _flat(params))


AuxLoss = Callable[[Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


def make_train_step(cfg: DTConfig, tcfg: TrainConfig, sample: Callable[[Any, jax.Array], dict],
                    aux_loss: AuxLoss | None = None):
    """Returns pure `step(state, data) -> (state, metrics)`; `sample(data, key) -> batch`.

    `aux_loss(params, batch, step, key) -> (scalar, {name: scalar})`, if given, is added to the
    loss inside the step (`step` is the number of updates already applied; `key` is
    ``fold_in(step key, 1)``, apart from the data and dropout keys); its value is logged as
    ``aux_loss`` and its metrics under their own names.
    """

    opt = optimizer(tcfg)

    def step(state: TrainState, data) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(_key(state.rng), state.step)
        data_key, drop_key = jax.random.split(key)
        batch = sample(data, data_key)

        def loss_fn(params):
            act = action_loss(cfg, params, batch, drop_key)
            reg = init_reg_loss(state, params) if state.anchor else jnp.zeros(())
            if aux_loss is None:
                return act + reg, (act, reg, {})
            aux, aux_metrics = aux_loss(params, batch, state.step, jax.random.fold_in(key, 1))
            return act + reg + aux, (act, reg, {"aux_loss": aux, **aux_metrics})

        (loss, (act, reg, aux_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "action_mse": act, "init_reg": reg, "grad_norm": grad_norm(opt_state),
                   "lr": learning_rate(opt_state), **aux_metrics}
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
        try:
            state = mngr.restore(latest, args=ocp.args.StandardRestore(template))
        except ValueError as e:  # orbax: the stored tree (or a leaf's shape) is not the template's
            raise ValueError(
                f"checkpoint {latest} in {workdir}/checkpoints does not fit the TrainState this run builds "
                "(another model/train config, or written before the optimizer became one optax chain); "
                f"use a new workdir. orbax: {e}") from e
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
