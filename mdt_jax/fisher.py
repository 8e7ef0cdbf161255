"""Diagonal Fisher information of a DT's action loss: the reference's batch-gradient estimator and
an exact per-example one, each one jitted `lax.scan` over batches, vmappable over models.

**faithful** (the reference's `compute_fisher`, decision-transformer/dt_utils.py): for each batch
b, with dropout on (train mode), take the gradient of the batch-mean action MSE L_b (mean over the
unmasked steps x action dims, `mdt_jax.losses.action_loss`) and square it; sum over batches; divide
by N, the number of unmasked timesteps counted over *all* batches together (the reference's
`n_samples += action_target.shape[0]`: (segment, step) pairs with mask 1, not times act_dim)::

    F = sum_b (grad L_b)^2 / N        trace = sum(F)        mean = trace / (number of entries of F)

**exact**: an *example* is one sampled segment (K steps) of a batch, and g_bi is its share of the
batch gradient: the gradient of its summed squared action error divided by the batch's (for
multi-task batches, its task's) count of unmasked step x action-dim entries, through the same
forward pass and dropout draw as the batch, so that grad L_b = sum_i g_bi exactly. Then::

    F = sum_b sum_i g_bi^2 / N        (same N, trace and mean)

so faithful = exact + sum_b sum_{i != j} g_bi g_bj: the two agree in expectation when the
per-example gradients are uncorrelated with mean zero, and exact drops the cross terms' noise.
The g_bi come without `vmap(grad)`: one forward and backward of the batch gives each tapped
module's input X and output cotangent G, and example i's gradient is X_i^T G_i for a dense
kernel (sum over its steps of G_i for a bias; likewise for LayerNorm scales and embeddings),
built for `chunk` examples and one module at a time, then squared and summed (its cost against
the faithful one: benchmarks/fisher.py).

Both are restricted to a parameter subset (`mdt_jax.subsets` patterns, or a bool tree shaped like
params; default the trunk blocks `block_*`, the reference's 'transformer.h'). Only the subset is
differentiated; the returned `fisher` is a full tree aligned with params, **zeros outside the
subset**, so merges can map it leaf by leaf against the params.

Multi-task models (the reference's `compute_fisher_multi`): by default the Fisher is computed on
every task's data separately (`num_batches` batches each, normalised by that task's N) and
averaged with equal weight over tasks; trace is then the *sum* of the per-task traces and mean the
mean of the per-task means, exactly as the reference's `_stats` (trace = n_tasks x sum(F); merges
normalise by trace, where the common factor cancels). `task=` computes it on that one task only
(the reference's `spec_info`: each finetune on its own task's data).

Resumable (`compute_fisher(..., chunk_batches=c, partial=store)`): the same dispatch, with each
task's batches run in chunks of c (one jitted scan each, returning the unnormalised sums), each
chunk's sums handed to `partial` (a `PartialSums`: a long job keeps them on disk) and taken from it
when it already holds them, then added in order and normalised. The result does not depend on
where a run was interrupted; it differs from the one-scan path only in the order of the float sums.

Grouped (`compute_fishers`): the Fishers of G same-shaped models (a leading model axis on params,
data and keys) in one jitted vmapped call, each member with the batches, keys and combination
`compute_fisher` gives it (equal up to float reassociation).
Single-task models of different tasks share one shape when padded to the widest state and action
(`pad_params`; padded state dims are 0, padded action dims masked out of the loss through
`batch['act_dim']`), so the padded entries' Fisher is 0 and `unpad_result` slices them away.

This module only computes; the artifacts (fisher.json + orbax tree) and the config-driven runs are
`mdt_jax.fisher_stage`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import sharding
from mdt_jax import trees
from mdt_jax.data.sampler import SegmentData, pad_to, sample_batch
from mdt_jax.losses import action_loss
from mdt_jax.models.dt import DTConfig, Linear, param_shapes

METHODS = ("faithful", "exact")
DEFAULT_SUBSET = "blocks"
CHUNK_BYTES = 1 << 28  # exact: per-example gradients held at once


class FisherError(ValueError):
    """A bad Fisher request, or a Fisher artifact that is missing, corrupt, or not a Fisher."""


class PartialSums(Protocol):
    """Where the chunked path keeps each chunk's sums: `get(key)` returns the sums stored under
    `key` or None, `put(key, sums)` stores them. `key` is ``{tag}_batches_{first:06d}`` (tag
    ``model`` for a single-task model, ``task{t}`` for task t of a multi-task one; `first` the
    chunk's first batch) and `sums` is ``{"sums": [summed squared gradients per subset leaf],
    "n": unmasked timesteps}`` as host arrays."""

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, sums: dict) -> None: ...


@flax.struct.dataclass
class FisherResult:
    """A diagonal Fisher. Under `jax.vmap` over models every array field has a leading model axis."""

    fisher: Any                # like params: F over the subset, zeros elsewhere
    trace: jax.Array           # float32: sum of F (multi-task average: sum of per-task traces)
    mean: jax.Array            # float32: trace / number of entries in the subset
    n_timesteps: jax.Array     # int32: N, unmasked timesteps over all batches (and tasks)
    n_batches: int = flax.struct.field(pytree_node=False)   # over all tasks
    method: str = flax.struct.field(pytree_node=False)


# --------------------------------------------------------------------------------------- compute

def subset_selection(params, subset=DEFAULT_SUBSET) -> tuple[bool, ...]:
    """The subset as one Python bool per leaf of `params` (patterns, aliases or a bool tree)."""
    mask = trees.mask(params, DEFAULT_SUBSET if subset is None else subset, error=FisherError)
    try:
        sel = tuple(bool(m) for m in jax.tree.leaves(mask))
    except jax.errors.ConcretizationTypeError:
        raise FisherError("subset: a bool mask tree must be concrete Python/numpy bools") from None
    if not any(sel):
        raise FisherError("subset: selects no parameter")
    return sel


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise FisherError(f"method: unknown Fisher method {method!r}; choose one of {METHODS}")


_TAPPED = (Linear, nn.LayerNorm, nn.Embed)


def _per_example_parts(module, x, g) -> dict:
    """Per-example gradients (leading example axis) of `module`'s params from one call's input
    `x` and output cotangent `g`."""
    mid = tuple(range(1, g.ndim - 1))  # the axes between the example axis and the features
    if isinstance(module, nn.Embed):
        onehot = jax.nn.one_hot(x, module.num_embeddings, dtype=g.dtype)
        return {"embedding": jnp.einsum("b...v,b...h->bvh", onehot, g)}
    if isinstance(module, nn.LayerNorm):
        mu = jnp.mean(x, -1, keepdims=True)
        xhat = (x - mu) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mu), -1, keepdims=True) + module.epsilon)
        return {"scale": jnp.sum(g * xhat, mid), "bias": jnp.sum(g, mid)}
    return {"kernel": jnp.einsum("b...i,b...o->bio", x, g), "bias": jnp.sum(g, mid)}


def _tapped_loss(cfg: DTConfig, params, batch: dict, key, modules: set, calls: list | None = None):
    """`loss(perts) -> (batch loss, inputs)`, with `perts[i]` added to the output of the i-th call
    of a module in `modules` and that call's input returned; `calls` (if given) collects each
    call's (module path, module, cols, output shape)."""

    def loss(perts):
        inputs = []

        def tap(next_fun, args, kwargs, ctx):
            path = "/".join(ctx.module.scope.path)
            if path not in modules or ctx.method_name == "setup":
                return next_fun(*args, **kwargs)
            if ctx.method_name != "__call__" or not isinstance(ctx.module, _TAPPED):
                raise FisherError(f"exact: no per-example rule for {type(ctx.module).__name__}.{ctx.method_name} "
                                  f"at {path}; use method='faithful' or a subset without it")
            y = next_fun(*args, **kwargs)
            if calls is not None:
                calls.append((path, ctx.module, kwargs.get("cols"), jax.ShapeDtypeStruct(y.shape, y.dtype)))
            inputs.append(args[0])
            return y if perts is None else y + perts[len(inputs) - 1]

        with nn.intercept_methods(tap):
            return action_loss(cfg, params, batch, key), inputs

    return loss


def _exact_squares(cfg: DTConfig, params, sel_paths: list[str], batch: dict, key, chunk: int | None) -> list:
    """sum_i g_i^2 over the examples of `batch`, for the leaves at `sel_paths`; g_i is example i's
    share of the batch-loss gradient (sum_i g_i = grad L_b, same dropout draw).

    One forward and one backward of the whole batch with zero perturbations on the outputs of the
    subset's modules: their cotangents G and inputs X give every example's gradient exactly (a
    dense kernel's is X_i^T G_i, since examples never interact in a DT), built for `chunk`
    examples and one module at a time, then squared and summed.
    """
    leaves = trees.flatten(params)
    wanted = set(sel_paths)
    modules = {p.rsplit("/", 1)[0] for p in sel_paths}
    calls: list = []
    jax.eval_shape(lambda: _tapped_loss(cfg, params, batch, key, modules, calls)(None)[0])  # trace only
    perts = [jnp.zeros(c[3].shape, c[3].dtype) for c in calls]
    _, vjp, inputs = jax.vjp(_tapped_loss(cfg, params, batch, key, modules), perts, has_aux=True)
    (cots,) = vjp(jnp.ones((), jnp.float32))
    B = batch["mask"].shape[0]
    chunk = chunk or _auto_chunk(B, max(leaves[p].size for p in sel_paths))
    if B % chunk:
        raise FisherError(f"chunk: {chunk} does not divide the batch size {B}")
    sq: dict = {}
    for path in sorted({c[0] for c in calls}):
        idx = [i for i, c in enumerate(calls) if c[0] == path]
        for rows in (slice(s, s + chunk) for s in range(0, B, chunk)):
            grads: dict = {}
            for i in idx:  # a module called more than once (e.g. q and kv columns of c_attn): add first
                cols = calls[i][2]
                for name, part in _per_example_parts(calls[i][1], inputs[i][rows], cots[i][rows]).items():
                    if f"{path}/{name}" not in wanted:
                        continue
                    if cols is not None:
                        part = jnp.zeros((chunk,) + leaves[f"{path}/{name}"].shape, part.dtype).at[..., cols].set(part)
                    grads[name] = grads[name] + part if name in grads else part
            for name, g in grads.items():
                k = f"{path}/{name}"
                sq[k] = sq[k] + sum_squares(g) if k in sq else sum_squares(g)
    return [sq[p] if p in sq else jnp.zeros_like(leaves[p]) for p in sel_paths]


def sum_squares(g: jax.Array) -> jax.Array:
    """sum_i g[i]^2 as unrolled elementwise adds: one loop fusion, where XLA:CPU's reduce over the
    major axis of a large array runs ~5x slower (measured: benchmarks/fisher.py)."""
    return sum(jnp.square(g[i]) for i in range(g.shape[0]))


def _auto_chunk(batch_size: int, largest: int) -> int:
    """The most examples whose per-example gradients of the largest tensor fit in CHUNK_BYTES."""
    fit = max(1, CHUNK_BYTES // (4 * largest))
    return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fit)


def _fisher_scan(cfg: DTConfig, params, get_batch: Callable, num_batches: int, rng, method: str,
                 sel: tuple[bool, ...], chunk: int | None, mesh=None, offset=0, raw: bool = False):
    """The Fisher over batches `get_batch(b)`, offset <= b < offset + num_batches, in one lax.scan;
    batch b's dropout key is `fold_in(rng, b)`. With a `mesh`, the batches are split across its
    devices (`sharding.sum_split`). `raw`: return the unnormalised sums instead, {"sums": [summed
    squared gradients of the subset's leaves], "n": unmasked timesteps} (`finish_sums` ends them)."""
    flat = trees.flatten(params)
    treedef = jax.tree.structure(params)
    if len(sel) != len(flat):
        raise FisherError(f"subset: {len(sel)} mask leaves for {len(flat)} parameters")
    leaves = list(flat.values())
    sub = [x for s, x in zip(sel, leaves) if s]
    sel_paths = [p for s, p in zip(sel, flat) if s]

    def with_sub(s):
        it = iter(s)
        return treedef.unflatten([next(it) if keep else x for keep, x in zip(sel, leaves)])

    def squares(batch, key):
        if method == "faithful":
            return [g * g for g in jax.grad(lambda s: action_loss(cfg, with_sub(s), batch, key))(sub)]
        return _exact_squares(cfg, params, sel_paths, batch, key, chunk)

    def body(carry, b_valid):
        (acc, n), (b, valid) = carry, b_valid
        b = b + offset
        batch = get_batch(b)
        sq = squares(batch, jax.random.fold_in(rng, b))
        keep = lambda x: jnp.where(valid, x, 0)  # padding batches of a split over devices add 0
        return ([a + keep(x) for a, x in zip(acc, sq)], n + keep(jnp.sum(batch["mask"]).astype(jnp.int32))), None

    def sums(idx, valid):
        init = ([jnp.zeros_like(x, jnp.float32) for x in sub], jnp.zeros((), jnp.int32))
        return jax.lax.scan(body, init, (idx, valid))[0]

    acc, n = sharding.sum_split(sums, num_batches, mesh)
    if raw:
        return {"sums": acc, "n": n}
    return finish_sums(params, sel, acc, n, num_batches, method)


def finish_sums(params, sel: tuple[bool, ...], acc: list, n, num_batches: int, method: str) -> FisherResult:
    """F = summed squares / unmasked timesteps, laid out like `params` (zeros outside `sel`)."""
    flat, treedef = jax.tree_util.tree_flatten(params)
    F = [a / jnp.maximum(n, 1).astype(jnp.float32) for a in acc]
    trace = sum(jnp.sum(f) for f in F)
    it = iter(F)
    fisher = treedef.unflatten([next(it) if keep else jnp.zeros_like(x, jnp.float32) for keep, x in zip(sel, flat)])
    return FisherResult(fisher=fisher, trace=trace, mean=trace / sum(x.size for x, k in zip(flat, sel) if k),
                        n_timesteps=jnp.asarray(n, jnp.int32), n_batches=num_batches, method=method)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "sel", "chunk", "mesh"))
def _from_batches(cfg, params, batches, rng, method, sel, chunk, mesh=None):
    n = jax.tree.leaves(batches)[0].shape[0]
    return _fisher_scan(cfg, params, lambda b: jax.tree.map(lambda x: x[b], batches), n, rng, method, sel, chunk,
                        mesh)


def fisher_from_batches(cfg: DTConfig, params, batches: dict, rng: jax.Array, *, method: str = "faithful",
                        subset=DEFAULT_SUBSET, chunk: int | None = None, mesh=None) -> FisherResult:
    """The Fisher over given batches: `batches` is a batch dict (`sample_batch` layout, plus
    `task_id` for multi-task models) with a leading axis of n batches. Batch b runs with dropout
    key `fold_in(rng, b)`, for both methods. `chunk` (exact): examples whose per-example gradients
    of one tensor are held at once (default: as many as fit in CHUNK_BYTES). `mesh`
    (`mdt_jax.sharding`): the batches are split across its devices; the same sums, in another order.

    Vmappable over models: ``jax.vmap(lambda p: fisher_from_batches(cfg, p, batches, rng))(stacked)``.
    """
    _check_method(method)
    return _from_batches(cfg, params, batches, rng, method, subset_selection(params, subset), chunk, mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "num_batches", "batch_size", "method", "sel", "chunk", "mesh",
                                             "raw"))
def _from_data(cfg, params, data, rng, task_id, num_batches, batch_size, method, sel, chunk, mesh=None, offset=0,
               raw=False, act_dim=None):
    data_key, drop_key = jax.random.split(rng)

    def get_batch(b):
        batch = sample_batch(data, jax.random.fold_in(data_key, b), batch_size)
        if act_dim is not None:  # a single-task model padded to a group's widest action
            batch = batch | {"act_dim": act_dim}
        return batch if task_id is None else batch | {"task_id": jnp.full((batch_size,), task_id, jnp.int32)}

    return _fisher_scan(cfg, params, get_batch, num_batches, drop_key, method, sel, chunk, mesh, offset, raw)


def average_tasks(per_task: FisherResult) -> FisherResult:
    """Combine per-task Fishers (a leading task axis) as the reference does: F averaged over
    tasks, trace summed, mean averaged, timesteps and batches summed."""
    T = per_task.trace.shape[0]
    return FisherResult(fisher=jax.tree.map(lambda f: jnp.mean(f, 0), per_task.fisher),
                        trace=jnp.sum(per_task.trace), mean=jnp.mean(per_task.mean),
                        n_timesteps=jnp.sum(per_task.n_timesteps), n_batches=T * per_task.n_batches,
                        method=per_task.method)


def _check_counts(**counts) -> None:
    for name, v in counts.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise FisherError(f"{name}: must be a positive int, got {v!r}")


def compute_fisher(cfg: DTConfig, params, data: SegmentData, rng: jax.Array, *, num_batches: int = 100,
                   batch_size: int = 64, method: str = "faithful", subset=DEFAULT_SUBSET,
                   task: int | str | None = None, chunk: int | None = None, mesh=None,
                   chunk_batches: int | None = None, partial: PartialSums | None = None) -> FisherResult:
    """The Fisher of `params` over `num_batches` batches of `batch_size` segments sampled on device
    from `data` (the reference's defaults: 100 x 64). With a `mesh` (`mdt_jax.sharding`), the
    batches are split across its devices.

    Batch b is ``sample_batch(data, fold_in(k_data, b), batch_size)`` and runs with dropout key
    ``fold_in(k_drop, b)``, where ``k_data, k_drop = split(rng)``. Normalisation is whatever `data`
    carries: give it the model's own state_mean/state_std (``data.replace(...)``).

    Single-task model: `data` is one task's SegmentData. Multi-task model: with `task` (name or
    index; the reference's `spec_info`), `data` is that task's SegmentData (padded here to the
    model's widths); without it, `data` is `stack_segment_data` over all of `cfg.tasks` in order,
    task t runs as above with the key ``fold_in(rng, t)``, and the per-task Fishers are combined
    by `average_tasks`.

    `chunk_batches` None: each task's batches in one jitted scan; vmappable over models, like
    `fisher_from_batches`. `chunk_batches` c: the resumable path (module docstring), c batches per
    jitted call, each chunk's sums kept in / reused from `partial` (a `PartialSums`, optional);
    it runs on the host between chunks, so it is not vmappable.
    """
    _check_method(method)
    _check_counts(num_batches=num_batches, batch_size=batch_size, chunk_batches=chunk_batches)
    if partial is not None and chunk_batches is None:
        raise FisherError("partial: only the chunked path keeps partial sums; give chunk_batches too")
    sel = subset_selection(params, subset)
    kw = dict(num_batches=num_batches, batch_size=batch_size, method=method, sel=sel, chunk=chunk, mesh=mesh)
    if chunk_batches is None:
        run = functools.partial(_from_data, cfg, params, **kw)
    else:
        run = functools.partial(_chunked, cfg, params, **kw, chunk_batches=chunk_batches, partial=partial)
    return over_tasks(cfg, data, rng, task, run, average_tasks, FisherError, "a multi-task Fisher",
                      looped=chunk_batches is not None)


def _chunked(cfg: DTConfig, params, data: SegmentData, rng, task_id, *, num_batches: int, batch_size: int,
             method: str, sel: tuple[bool, ...], chunk, mesh, chunk_batches: int,
             partial: PartialSums | None) -> FisherResult:
    """One task's Fisher in chunks of `chunk_batches` batches: each chunk's raw sums from `partial`
    or from one jitted scan (batches first..first+c-1, the same keys as the one-scan path), added
    in chunk order on the host, then normalised by `finish_sums`."""
    tag = "model" if task_id is None else f"task{int(task_id)}"
    total = None
    for first in range(0, num_batches, chunk_batches):
        key = f"{tag}_batches_{first:06d}"
        part = partial.get(key) if partial is not None else None
        if part is None:
            part = jax.device_get(_from_data(cfg, params, data, rng, task_id, min(chunk_batches, num_batches - first),
                                             batch_size, method, sel, chunk, mesh, first, True))
            if partial is not None:
                partial.put(key, part)
        total = part if total is None else {"sums": [a + b for a, b in zip(total["sums"], part["sums"])],
                                            "n": total["n"] + part["n"]}
    return finish_sums(params, sel, total["sums"], total["n"], num_batches, method)


def over_tasks(cfg: DTConfig, data, rng, task, run: Callable, average: Callable, error: type[Exception], what: str,
               *, looped: bool = False):
    """A per-model statistic over its data, the reference's way (`compute_fisher` / `_multi`):
    `run(data, rng, task_id)` on a single-task model's data; on one task's data of a multi-task
    model (`task`: the reference's spec_info); or on every task of a multi-task model (data stacked
    per task, one fold_in key each) and `average`d over tasks. Shared by the Fisher and the Grams.
    `looped`: the tasks run one after another from Python (for a `run` with host side effects,
    such as the chunked Fisher), not as one `lax.map`; their results are stacked the same way."""
    stacked = data.traj_lens.ndim == 2
    if not cfg.multi:
        if task is not None or stacked:
            raise error("task: a single-task model takes one task's (unstacked) SegmentData and no task")
        return run(data, rng, None)
    if task is not None:
        t = cfg.task_index(task) if isinstance(task, str) else int(task)
        if not 0 <= t < len(cfg.tasks) or stacked:
            raise error(f"task: {task!r} must name one of {cfg.task_names}, with that task's unstacked data")
        return run(pad_to(data, cfg.state_dim, cfg.act_dim), rng, jnp.int32(t))
    T = len(cfg.tasks)
    if not stacked or data.traj_lens.shape[0] != T:
        raise error(f"data: {what} over every task needs SegmentData stacked over the model's {T} tasks "
                    f"{cfg.task_names} (stack_segment_data), or pass task=")
    if looped:
        per_task = [run(jax.tree.map(lambda x: x[t], data), jax.random.fold_in(rng, t), jnp.int32(t)) for t in range(T)]
        return average(jax.tree.map(lambda *xs: jnp.stack(xs), *per_task))
    keys = jax.vmap(functools.partial(jax.random.fold_in, rng))(jnp.arange(T))
    per_task = jax.lax.map(lambda a: run(*a), (data, keys, jnp.arange(T, dtype=jnp.int32)))
    return average(per_task)


# ------------------------------------------------------------------------------- grouped Fishers

def compute_fishers(cfg: DTConfig, stacked_params, stacked_data: SegmentData, rngs: jax.Array, *,
                    num_batches: int = 100, batch_size: int = 64, method: str = "faithful", subset=DEFAULT_SUBSET,
                    tasks: Sequence[int | str] | None = None, act_dims: Sequence[int] | None = None,
                    chunk: int | None = None) -> FisherResult:
    """The Fishers of G models of one shape `cfg` in one jitted call vmapped over a leading model
    axis: `stacked_params` (G, ...), `stacked_data` (G, ...) and `rngs` (G,) keys; member i is
    `compute_fisher(cfg, params[i], data[i], rngs[i], ...)` with the same batches, keys and
    combination (equal up to float reassociation). Returns a FisherResult with a leading G axis.

    Single-task `cfg`: member i's data is one task's SegmentData, stacked with `stack_segment_data`
    (which pads steps and trajectories; padded trajectories are never drawn). `act_dims` (G,):
    each member's own action width when the group is padded to a wider `cfg` (`pad_params`; the
    padded action dims are masked out of the loss); default `cfg.act_dim` for all. Multi-task `cfg`
    with `tasks` (G,): member i's data is task tasks[i]'s (the reference's spec_info; padded here
    to the model's widths); without `tasks`: member i's data is stacked over `cfg.tasks` (G, T, ...)
    and its per-task Fishers are averaged (`average_tasks`).
    """
    _check_method(method)
    _check_counts(num_batches=num_batches, batch_size=batch_size)
    G = _group_size(stacked_params, stacked_data, rngs)
    task_ids = acts = None
    if tasks is not None:
        if not cfg.multi:
            raise FisherError("tasks: a single-task group takes no tasks (use act_dims for padded actions)")
        if len(tasks) != G:
            raise FisherError(f"tasks: {len(tasks)} tasks for a group of {G} models")
        ids = [cfg.task_index(t) if isinstance(t, str) else int(t) for t in tasks]
        if any(not 0 <= t < len(cfg.tasks) for t in ids):
            raise FisherError(f"tasks: {list(tasks)} must each name one of {cfg.task_names}")
        task_ids = jnp.asarray(ids, jnp.int32)
        stacked_data = pad_to(stacked_data, cfg.state_dim, cfg.act_dim)
    want = 2 + (cfg.multi and tasks is None)  # (G, [T,] M) trajectory lengths
    if stacked_data.traj_lens.ndim != want:
        raise FisherError(f"stacked_data: trajectory lengths have shape {stacked_data.traj_lens.shape}; a group of "
                          + ("multi-task models over every task needs (G, T, M): each member's stack_segment_data"
                             if want == 3 else "one task's data per member needs (G, M): stack_segment_data over members"))
    if act_dims is not None:
        if cfg.multi:
            raise FisherError("act_dims: multi-task models know their tasks' action widths; give tasks instead")
        if len(act_dims) != G or any(not isinstance(a, (int, np.integer)) or not 0 < a <= cfg.act_dim for a in act_dims):
            raise FisherError(f"act_dims: need {G} ints in 1..{cfg.act_dim} (cfg.act_dim), got {list(act_dims)}")
        acts = jnp.asarray(act_dims, jnp.int32)
    sel = subset_selection(jax.tree.map(lambda x: x[0], stacked_params), subset)
    return _group(cfg, stacked_params, stacked_data, rngs, task_ids, acts, num_batches, batch_size, method, sel,
                  chunk, cfg.multi and tasks is None)


def _group_size(stacked_params, stacked_data: SegmentData, rngs) -> int:
    leads = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(stacked_params)}
    if len(leads) != 1 or None in leads:
        raise FisherError(f"stacked_params: every leaf needs the same leading model axis, got sizes {sorted(map(str, leads))}")
    (G,) = leads
    if np.shape(rngs) != (G,):
        raise FisherError(f"rngs: need ({G},) keys (one per model), got shape {np.shape(rngs)}")
    if stacked_data.traj_lens.shape[0] != G:
        raise FisherError(f"stacked_data: leading axis {stacked_data.traj_lens.shape[0]} for {G} models")
    return G


@functools.partial(jax.jit, static_argnames=("cfg", "num_batches", "batch_size", "method", "sel", "chunk",
                                             "every_task"))
def _group(cfg, params, data, rngs, task_ids, act_dims, num_batches, batch_size, method, sel, chunk, every_task):
    def one(p, d, key, task_id, act_dim):
        run = lambda d, k, t: _from_data(cfg, p, d, k, t, num_batches, batch_size, method, sel, chunk, act_dim=act_dim)
        if every_task:
            return over_tasks(cfg, d, key, None, run, average_tasks, FisherError, "a multi-task Fisher")
        return run(d, key, task_id)

    return jax.vmap(one)(params, data, rngs, task_ids, act_dims)


def widest_config(cfgs: Sequence[DTConfig]) -> DTConfig:
    """The one single-task shape of `cfgs`: the widest state and action, every other field shared
    (refused otherwise: such models cannot be grouped)."""
    if not cfgs or any(c.multi for c in cfgs):
        raise FisherError("cfgs: padding groups single-task models (one or more)")
    wide = cfgs[0].replace(state_dim=max(c.state_dim for c in cfgs), act_dim=max(c.act_dim for c in cfgs))
    for i, c in enumerate(cfgs):
        if c.replace(state_dim=wide.state_dim, act_dim=wide.act_dim) != wide:
            raise FisherError(f"cfgs[{i}]: differs from cfgs[0] in more than state_dim/act_dim; not one group")
    return wide


def pad_params(wide: DTConfig, params) -> dict:
    """`params` zero-padded to `wide`'s shapes (embed_state rows, embed_action rows, predict_action
    columns): the padded model's output on the real dims is the original's."""
    shapes = trees.flatten(param_shapes(wide))
    flat = trees.flatten(params)
    if set(flat) != set(shapes):
        raise FisherError(f"params: not the tree of {wide.tasks or 'a single-task'} model: "
                          f"{sorted(set(flat) ^ set(shapes))[:5]}")
    out = {}
    for k, x in flat.items():
        want = shapes[k].shape
        if len(want) != np.ndim(x) or any(s > w for s, w in zip(np.shape(x), want)):
            raise FisherError(f"params: {k} has shape {np.shape(x)}, which does not fit in {want}")
        out[k] = jnp.pad(x, [(0, w - s) for s, w in zip(np.shape(x), want)])
    return trees.unflatten(out)


def unpad_result(cfg: DTConfig, result: FisherResult, subset=DEFAULT_SUBSET) -> FisherResult:
    """One member's Fisher (no model axis) of a padded group, sliced to its own `cfg`'s shapes; the
    mean recounted over its own subset (the padded entries are 0, so the trace is unchanged)."""
    shapes = param_shapes(cfg)
    fisher = jax.tree.map(lambda f, s: f[tuple(slice(0, n) for n in s.shape)], result.fisher, shapes)
    sel = subset_selection(shapes, subset)
    count = sum(x.size for x, k in zip(jax.tree.leaves(shapes), sel) if k)
    return result.replace(fisher=fisher, mean=result.trace / count)
