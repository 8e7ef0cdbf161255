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
built for `chunk` examples and one module at a time, then squared and summed (about 1.1-1.2x the
faithful cost at H128 L3 K20 B64 on CPU, benchmarks/fisher.py).

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

Artifacts (`save_fisher` / `load_fisher`), written atomically and never overwritten::

    DIR/fisher.json   {"format": "mdt_jax.fisher", "format_version": 1, "method", "trace", "mean",
                       "n_timesteps", "n_batches", "metadata": {...}}
    DIR/fisher/       orbax StandardCheckpointer pytree: the Fisher tree (params layout)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import sharding
from mdt_jax import trees
from mdt_jax.fileio import orbax_read, orbax_writer, read_header, write_dir_atomic, write_json_atomic
from mdt_jax.data.sampler import SegmentData, pad_to, sample_batch
from mdt_jax.models.dt import DTConfig, Linear
from mdt_jax.fileio import run_config_guard
from mdt_jax.losses import action_loss

METHODS = ("faithful", "exact")
DEFAULT_SUBSET = "blocks"
CHUNK_BYTES = 1 << 28  # exact: per-example gradients held at once


class FisherError(ValueError):
    """A bad Fisher request, or a Fisher artifact that is missing, corrupt, or not a Fisher."""


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
               raw=False):
    data_key, drop_key = jax.random.split(rng)

    def get_batch(b):
        batch = sample_batch(data, jax.random.fold_in(data_key, b), batch_size)
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


def compute_fisher(cfg: DTConfig, params, data: SegmentData, rng: jax.Array, *, num_batches: int = 100,
                   batch_size: int = 64, method: str = "faithful", subset=DEFAULT_SUBSET,
                   task: int | str | None = None, chunk: int | None = None, mesh=None) -> FisherResult:
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
    by `average_tasks`. Vmappable over models, like `fisher_from_batches`.
    """
    _check_method(method)
    for name, v in (("num_batches", num_batches), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise FisherError(f"{name}: must be a positive int, got {v!r}")
    sel = subset_selection(params, subset)
    run = functools.partial(_from_data, cfg, params, num_batches=num_batches, batch_size=batch_size,
                            method=method, sel=sel, chunk=chunk, mesh=mesh)
    return over_tasks(cfg, data, rng, task, run, average_tasks, FisherError, "a multi-task Fisher")


def over_tasks(cfg: DTConfig, data, rng, task, run: Callable, average: Callable, error: type[Exception], what: str):
    """A per-model statistic over its data, the reference's way (`compute_fisher` / `_multi`):
    `run(data, rng, task_id)` on a single-task model's data; on one task's data of a multi-task
    model (`task`: the reference's spec_info); or on every task of a multi-task model (data stacked
    per task, one fold_in key each) and `average`d over tasks. Shared by the Fisher and the Grams."""
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
    keys = jax.vmap(functools.partial(jax.random.fold_in, rng))(jnp.arange(T))
    per_task = jax.lax.map(lambda a: run(*a), (data, keys, jnp.arange(T, dtype=jnp.int32)))
    return average(per_task)


# ----------------------------------------------------------------------------------- artifacts

FORMAT = "mdt_jax.fisher"
FORMAT_VERSION = 1
META_FILE = "fisher.json"
ARRAYS = "fisher"


def _check_values(tree, where: str) -> None:
    trees.check_finite(tree, error=FisherError, where=where, kind="Fisher values")
    trees.check_nonnegative(tree, error=FisherError, where=where, kind="Fisher values")


def save_fisher(directory, result: FisherResult, metadata: dict | None = None) -> str:
    """Atomically write one model's Fisher to `directory` (refused if it exists and is non-empty)."""
    directory = os.path.abspath(os.fspath(directory))
    if np.ndim(result.trace):
        raise FisherError(f"save_fisher: one model's Fisher only (trace has shape {np.shape(result.trace)}); "
                          "index the stacked result first")
    _check_values(result.fisher, f"save_fisher({directory})")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": result.method,
            "trace": float(result.trace), "mean": float(result.mean), "n_timesteps": int(result.n_timesteps),
            "n_batches": int(result.n_batches), "metadata": metadata or {}}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise FisherError(f"save_fisher: metadata is not JSON-serialisable: {e}") from None

    return write_dir_atomic(directory, {ARRAYS: orbax_writer(result.fisher), META_FILE: lambda p: write_json_atomic(p, meta)})


def load_fisher(directory) -> tuple[FisherResult, dict]:
    """(FisherResult, metadata) from a `save_fisher` folder; refuses anything that is not a
    complete Fisher artifact with finite, non-negative values (the error names the path)."""
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, META_FILE)
    meta = read_header(directory, META_FILE, FORMAT, FORMAT_VERSION, FisherError, "Fisher artifact")
    if meta.get("method") not in METHODS:
        raise FisherError(f"{path}: unknown method {meta.get('method')!r}")
    for k in ("trace", "mean"):
        v = meta.get(k)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise FisherError(f"{path}: {k} must be a finite number >= 0, got {v!r}")
    for k in ("n_timesteps", "n_batches"):
        if not isinstance(meta.get(k), int) or meta[k] <= 0:
            raise FisherError(f"{path}: {k} must be a positive int, got {meta.get(k)!r}")
    adir = os.path.join(directory, ARRAYS)
    fisher = orbax_read(adir, FisherError, "Fisher artifact")
    _check_values(fisher, adir)
    result = FisherResult(fisher=fisher, trace=jnp.float32(meta["trace"]), mean=jnp.float32(meta["mean"]),
                          n_timesteps=jnp.int32(meta["n_timesteps"]), n_batches=meta["n_batches"],
                          method=meta["method"])
    return result, meta.get("metadata") or {}


def load_fishers(paths: list[str]) -> list[dict]:
    """The Fisher trees of `save_fisher` folders, in order."""
    return [load_fisher(p)[0].fisher for p in paths]


# ------------------------------------------------------------------ edge: config -> Fisher files

def _chunked_fisher(cfg: DTConfig, params, data: SegmentData, rng, *, num_batches: int, batch_size: int,
                    method: str, subset, task=None, partial_dir: str, chunk_batches: int) -> FisherResult:
    """`compute_fisher`, resumable: the batches run in chunks of `chunk_batches`, each chunk's sums
    saved (atomically) under `partial_dir` and reused on a rerun, then added in order. The result
    is the same whether or not the run was interrupted (it differs from one `compute_fisher` call
    only in the order of the float sums)."""
    sel = subset_selection(params, subset)

    def one_task(data, key, task_id, tag):
        total = None
        for c, first in enumerate(range(0, num_batches, chunk_batches)):
            path = os.path.join(partial_dir, f"{tag}_batches_{first:06d}")
            if os.path.isdir(path):
                part = orbax_read(os.path.join(path, "sums"), FisherError, "partial Fisher")
                part = {"sums": [part["sums"][str(i)] for i in range(len(part["sums"]))], "n": part["n"]}
            else:
                part = jax.device_get(_from_data(cfg, params, data, key, task_id, min(chunk_batches, num_batches - first),
                                                 batch_size, method, sel, None, None, first, True))
                write_dir_atomic(path, {"sums": orbax_writer({"sums": {str(i): a for i, a in enumerate(part["sums"])},
                                                              "n": np.asarray(part["n"])})})
            total = part if total is None else {"sums": [a + b for a, b in zip(total["sums"], part["sums"])],
                                                "n": total["n"] + part["n"]}
        return finish_sums(params, sel, total["sums"], total["n"], num_batches, method)

    if not cfg.multi:
        return one_task(data, rng, None, "model")
    if task is not None:
        t = cfg.task_index(task)
        return one_task(pad_to(data, cfg.state_dim, cfg.act_dim), rng, jnp.int32(t), f"task{t}")
    per_task = [one_task(jax.tree.map(lambda x: x[t], data), jax.random.fold_in(rng, t), jnp.int32(t), f"task{t}")
                for t in range(len(cfg.tasks))]
    return average_tasks(jax.tree.map(lambda *xs: jnp.stack(xs), *per_task))


@dataclasses.dataclass(frozen=True)
class FisherRun:
    """One Fisher computation (configs/fisher.py's fields, typed; see that file)."""

    checkpoint: str = ""
    dataset: tuple[str, ...] = ()
    method: str = "faithful"
    num_batches: int = 100
    batch_size: int = 64
    subset: str = "blocks"
    spec_info: bool = False
    chunk_batches: int = 25
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.dataset, str):
            raise TypeError("FisherRun.dataset: a tuple of dataset specs, not a string")
        object.__setattr__(self, "dataset", tuple(self.dataset))

    def run_config(self) -> dict:
        """This run in configs/fisher.py's layout, as the partial folder records it."""
        return dataclasses.asdict(self) | {"dataset": ",".join(self.dataset)}


def fisher_run(config: FisherRun, workdir: str) -> str:
    """Run configs/fisher.py: the Fisher of a checkpoint on its dataset(s) -> `workdir` (fisher/ +
    fisher.json); returns a one-line summary."""
    from mdt_jax import checkpoint
    from mdt_jax.data.loading import model_task_data

    if config.method not in METHODS:
        raise ValueError(f"config.method: unknown Fisher method {config.method!r}; choose one of {METHODS}")
    for f in ("num_batches", "batch_size"):
        if getattr(config, f) <= 0:
            raise ValueError(f"config.{f}: must be a positive int, got {getattr(config, f)}")
    if not config.checkpoint:
        raise ValueError("config.checkpoint: no model checkpoint given")
    datasets = list(config.dataset)
    if not datasets:
        raise ValueError("config.dataset: no dataset given (a .hdf5/.pkl path or minari:<id>)")
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise FileExistsError(f"{workdir} already exists and is not empty; use a new --workdir")
    cb = config.chunk_batches
    if not isinstance(cb, int) or cb <= 0:
        raise ValueError(f"config.chunk_batches: must be a positive int, got {cb!r}")
    model = checkpoint.load(config.checkpoint)
    cfg, params = model.cfg, model.params
    common = dict(num_batches=config.num_batches, batch_size=config.batch_size, method=config.method,
                  subset=config.subset or DEFAULT_SUBSET)
    rng = jax.random.key(config.seed)
    partial = os.path.abspath(workdir).rstrip("/") + ".partial"
    run_config_guard(partial, config.run_config() | {"checkpoint": os.path.abspath(config.checkpoint)})
    compute_fisher = functools.partial(_chunked_fisher, partial_dir=partial, chunk_batches=cb)
    tasks, data, task = model_task_data(model, datasets, one_task=bool(config.spec_info))
    result = compute_fisher(cfg, params, data, rng, **({"task": task} if task else {}), **common)
    result = jax.device_get(result)
    record = {"checkpoint": os.path.abspath(config.checkpoint), "datasets": datasets, "tasks": tasks,
              "spec_info": bool(config.spec_info), "subset": common["subset"], "seed": int(config.seed),
              "batch_size": int(config.batch_size), "num_batches_per_task": int(config.num_batches)}
    out = save_fisher(workdir, result, record)
    shutil.rmtree(partial, ignore_errors=True)
    return (f"{config.method} Fisher over {result.n_batches} batches x {config.batch_size} "
            f"({int(result.n_timesteps)} timesteps) on {','.join(map(str, tasks))}: "
            f"trace {float(result.trace):.6g}, mean {float(result.mean):.6g} -> {out}")
