"""RegMean: merge each trunk Linear by the closed-form least-squares fit to every model's own
layer outputs (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023).

For a Linear with kernel W_i (in, out) in model i and inputs X_i (rows: tokens of model i's own
task data), the merge minimises sum_i ||X_i W - X_i W_i||^2, whose solution is::

    W = (sum_i G_i)^-1 sum_i G_i W_i,       G_i = X_i^T X_i / n_i          (in, in)

and the paper regularises it by shrinking the off-diagonal entries of every Gram by alpha::

    G~_i = alpha G_i + (1 - alpha) diag(G_i)        alpha in [0, 1]; default 0.9

alpha = 1 is the exact least-squares merge; alpha = 0 weights each input feature r separately,
W[r] = sum_i G_i[r, r] W_i[r] / sum_j G_j[r, r] (a diagonal, per-input-feature weighted average).
The trunk Linears of a DT are, per block, attn/c_attn (the fused qkv: its three column blocks
share one input, so one Gram), attn/c_proj, mlp/c_fc and mlp/c_proj; kernels are stored (in, out),
so the formula applies to the kernel as stored (no transpose).

What the original code does, and what we follow (read from bloomberg/dataless-model-merging,
src/model_merge/local_trainer.py `compute_grams` and avg_merger.py `regmean_mean_params`, and
FusionBench, tanganke/fusion_bench method/regmean/regmean.py, adapted from MergeLM):

- **Averaged, not summed.** Both hook every Linear's input, flatten it to rows and keep a running
  mean ``X^T X / rows`` over the batches: G_i is normalised by model i's own row count, so models
  with more data do not weigh more. We keep the sum and the count and store the mean.
- **Which tokens.** Both count every row of the batch, padding positions included (no attention
  mask is applied to the hook's input). Here only the tokens of unmasked timesteps count (all
  three tokens, rtg, state and action, of each real step; left padding never does), a deliberate
  deviation: padded tokens carry the sampler's fill values (actions -10), which no real input
  resembles. The forward is the full trunk on every token (`outputs='all'`, the GPT-2 forward of
  the reference), deterministic (no dropout).
- **Biases and the rest.** Only the ``.weight`` of a module that has a Gram is RegMean-merged;
  biases and every other selected parameter (LayerNorms, here) are plainly averaged. We do the
  same: inside `subset`, trunk Linear kernels by RegMean, every other leaf by the mean; outside
  `subset`, model `keep`'s own values (the convention of `mdt_jax.merge`).
- **Regulariser.** ``reduce_non_diag(cov, a)`` multiplies the off-diagonals by a and keeps the
  diagonal: the G~ above with alpha = a.
- **Solve.** Both call ``torch.inverse`` on sum_i G~_i. We solve instead, after a symmetric
  diagonal (Jacobi) rescaling D S D with D = diag(S)^-1/2 (the same solution, W = D (D S D)^-1 D R):
  the rescaled matrix is alpha C + (1 - alpha) I with C a correlation matrix, so for alpha < 1 its
  condition number is at most (alpha d + 1 - alpha) / (1 - alpha), whatever the feature scales.
  A Gram sum that is still singular (an input feature that is zero on every model's data, a zero
  diagonal entry, or alpha near 1 with rank-deficient data) raises `MergeError` naming the layer
  when the inputs are concrete; under jit/vmap no check runs and such a layer comes out non-finite.

Multi-task models: with `task=` the Grams are over that task's data only (a per-task finetune on
its own task, as RegMean intends); without it, over every task's data, each task's mean Gram
computed separately and the task means averaged with equal weight (as `mdt_jax.fisher` combines
per-task Fishers), token counts summed.

Artifacts (`save_grams` / `load_grams`), written atomically and never overwritten::

    DIR/grams.json   {"format": "mdt_jax.grams", "format_version": 1, "n_tokens", "n_batches",
                      "layers": [module paths], "metadata": {...}}
    DIR/grams/       orbax StandardCheckpointer pytree: {block_i: {attn: {c_attn, c_proj},
                      mlp: {c_fc, c_proj}}}, each the (in, in) mean Gram
"""
from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import merge as M, subsets
from mdt_jax import trees
from mdt_jax.data.sampler import SegmentData, sample_batch
from mdt_jax.fisher import over_tasks
from mdt_jax.fileio import orbax_read, orbax_writer, read_header, write_dir_atomic, write_json_atomic
from mdt_jax.models.dt import DTConfig, Linear, apply

TRUNK_LINEARS = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
DEFAULT_ALPHA = 0.9
DEFAULT_SUBSET = "blocks"
MAX_COND = 1.0 / float(np.finfo(np.float32).eps)  # the float32 solve keeps no correct digit beyond this
_HI = jax.lax.Precision.HIGHEST  # no reduced-precision (TF32/bf16) passes for the Grams and the merge


class GramError(ValueError):
    """A bad Gram request, or a Gram artifact that is missing, corrupt, or not a Gram artifact."""


@flax.struct.dataclass
class Grams:
    """Per-layer input Gram matrices of one model. Under `jax.vmap` over models every array field
    has a leading model axis."""

    gram: dict                 # {block_i: {attn: {c_attn, c_proj}, mlp: {c_fc, c_proj}}}: (in, in) mean X^T X
    n_tokens: jax.Array        # int32: tokens counted over all batches (and tasks)
    n_batches: int = flax.struct.field(pytree_node=False)   # over all tasks


def trunk_linear_paths(cfg: DTConfig) -> list[str]:
    """The module paths of the trunk Linears, e.g. ``block_0/attn/c_attn``."""
    return [f"block_{i}/{name}" for i in range(cfg.n_layer) for name in TRUNK_LINEARS]


def flat_grams(grams) -> dict:
    """{module path: Gram} of a Grams or a nested Gram dict."""
    tree = grams.gram if isinstance(grams, Grams) else grams
    return trees.flatten(tree)


# --------------------------------------------------------------------------------------- compute

def _batch_sums(cfg: DTConfig, params, batch: dict, paths: list[str]):
    """({path: sum over counted tokens of x x^T}, tokens counted) for one batch: one deterministic
    forward of the whole trunk, each trunk Linear's input read by a flax method interceptor (the
    model's own modules run unchanged)."""
    tok = jnp.repeat(batch["mask"], 3, axis=1).astype(jnp.float32)   # (B, 3K): every token of a real step
    wanted, sums = set(paths), {}

    def tap(next_fun, args, kwargs, ctx):
        if ctx.method_name != "__call__" or not isinstance(ctx.module, Linear):
            return next_fun(*args, **kwargs)
        path = "/".join(ctx.module.scope.path)
        if path not in wanted:
            return next_fun(*args, **kwargs)
        x = args[0]
        if kwargs.get("cols") is not None or len(args) > 1 or x.shape[:2] != tok.shape or path in sums:
            raise GramError(f"{path}: expected one call on every token (B, 3K, in), got {x.shape}")
        xw = (x * tok[..., None].astype(x.dtype)).reshape(-1, x.shape[-1]).astype(jnp.float32)
        sums[path] = jnp.dot(xw.T, xw, precision=_HI)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(tap):
        apply(cfg, params, batch["states"], batch["actions"], batch["rtg"], batch["timesteps"], batch["mask"],
              batch.get("task_id"), outputs="all")
    missing = sorted(wanted - set(sums))
    if missing:
        raise GramError(f"no input seen for trunk Linear(s) {missing}")
    return sums, jnp.sum(tok).astype(jnp.int32)


def _gram_scan(cfg: DTConfig, params, get_batch, num_batches: int) -> Grams:
    """Mean Grams over batches ``get_batch(b)``, 0 <= b < num_batches, in one lax.scan."""
    paths = trunk_linear_paths(cfg)
    leaves = trees.flatten(params)
    for p in paths:
        if f"{p}/kernel" not in leaves:
            raise GramError(f"params: no {p}/kernel (params do not match the config)")
    dims = {p: leaves[f"{p}/kernel"].shape[-2] for p in paths}

    def body(carry, b):
        acc, n = carry
        sums, cnt = _batch_sums(cfg, params, get_batch(b), paths)
        return ({p: acc[p] + sums[p] for p in paths}, n + cnt), None

    init = ({p: jnp.zeros((dims[p], dims[p]), jnp.float32) for p in paths}, jnp.zeros((), jnp.int32))
    (acc, n), _ = jax.lax.scan(body, init, jnp.arange(num_batches))
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    mean = {p: 0.5 * (a + a.T) / denom for p, a in acc.items()}   # exact symmetry, whatever the summation order
    return Grams(gram=trees.unflatten(mean), n_tokens=n, n_batches=num_batches)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _from_batches(cfg, params, batches):
    n = jax.tree.leaves(batches)[0].shape[0]
    return _gram_scan(cfg, params, lambda b: jax.tree.map(lambda x: x[b], batches), n)


def grams_from_batches(cfg: DTConfig, params, batches: dict) -> Grams:
    """Mean Grams over given batches: a batch dict (`sample_batch` layout, plus `task_id` for
    multi-task models) with a leading axis of n batches. Vmappable over models."""
    return _from_batches(cfg, params, batches)


@functools.partial(jax.jit, static_argnames=("cfg", "num_batches", "batch_size"))
def _from_data(cfg, params, data, rng, task_id, num_batches, batch_size):
    data_key, _ = jax.random.split(rng)   # the batches `fisher.compute_fisher` draws with the same rng

    def get_batch(b):
        batch = sample_batch(data, jax.random.fold_in(data_key, b), batch_size)
        return batch if task_id is None else batch | {"task_id": jnp.full((batch_size,), task_id, jnp.int32)}

    return _gram_scan(cfg, params, get_batch, num_batches)


def average_tasks(per_task: Grams) -> Grams:
    """Per-task Grams (a leading task axis) combined: mean Grams averaged over tasks with equal
    weight, tokens and batches summed."""
    T = per_task.n_tokens.shape[0]
    return Grams(gram=jax.tree.map(lambda g: jnp.mean(g, 0), per_task.gram), n_tokens=jnp.sum(per_task.n_tokens),
                 n_batches=T * per_task.n_batches)


def compute_grams(cfg: DTConfig, params, data: SegmentData, *, num_batches: int, batch_size: int, rng: jax.Array,
                  task: int | str | None = None) -> Grams:
    """Mean input Grams of every trunk Linear of `params` over `num_batches` batches of
    `batch_size` segments sampled on device from `data`, forward passes only (no dropout).

    Batch b is ``sample_batch(data, fold_in(k_data, b), batch_size)`` with ``k_data = split(rng)[0]``
    (the batches `mdt_jax.fisher.compute_fisher` draws with the same rng). Normalisation is
    whatever `data` carries: give it the model's own state_mean/state_std.

    Single-task model: `data` is one task's SegmentData. Multi-task model: with `task` (name or
    index), `data` is that task's SegmentData (padded here to the model's widths); without it,
    `data` is `stack_segment_data` over all of `cfg.tasks` in order, task t runs as above with the
    key ``fold_in(rng, t)``, and the per-task Grams are combined by `average_tasks`.

    Vmappable over models: ``jax.vmap(lambda p: compute_grams(cfg, p, data, ...))(stacked)``.
    """
    for name, v in (("num_batches", num_batches), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise GramError(f"{name}: must be a positive int, got {v!r}")
    run = functools.partial(_from_data, cfg, params, num_batches=num_batches, batch_size=batch_size)
    return over_tasks(cfg, data, rng, task, run, average_tasks, GramError, "multi-task Grams")


# ------------------------------------------------------------------------------------------ merge

@jax.jit
def _regmean_leaf(W, G, alpha):
    """(sum_i G~_i)^-1 sum_i G~_i W_i for stacked kernels W (M, in, out) and Grams G (M, in, in),
    solved after the Jacobi rescaling; also returns the rescaled system matrix and its diagonal."""
    d = G.shape[-1]
    eye = jnp.eye(d, dtype=jnp.float32)
    Gt = G.astype(jnp.float32) * (alpha + (1.0 - alpha) * eye)   # off-diagonals x alpha, diagonal kept
    S = jnp.sum(Gt, axis=0)
    R = jnp.einsum("mij,mjo->io", Gt, W.astype(jnp.float32), precision=_HI)
    diag = jnp.diagonal(S)
    s = jnp.where(diag > 0, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1.0)), 1.0)
    A = S * s[:, None] * s[None, :]
    merged = s[:, None] * jnp.linalg.solve(A, s[:, None] * R)
    return merged.astype(W.dtype), A, diag


def _check_solvable(path: str, A, diag, merged, alpha) -> None:
    A, diag = np.asarray(A, np.float64), np.asarray(diag, np.float64)
    dead = np.flatnonzero(~(diag > 0))
    if dead.size:
        raise M.MergeError(f"regmean: the Gram sum of {path} is singular: {dead.size} input feature(s) "
                           f"(first {dead[:5].tolist()}) are zero on every model's data")
    eig = np.linalg.eigvalsh(0.5 * (A + A.T)) if np.all(np.isfinite(A)) else np.asarray([np.nan])
    cond = eig[-1] / eig[0] if eig[0] > 0 else np.inf   # A is symmetric PSD: its eigenvalues give the 2-norm cond
    if not np.isfinite(cond) or cond > MAX_COND or not np.all(np.isfinite(np.asarray(merged))):
        raise M.MergeError(f"regmean: the Gram sum of {path} is numerically singular (condition number "
                           f"{cond:.3g} after diagonal rescaling, limit {MAX_COND:.3g}) at alpha={float(alpha):g}; "
                           "use a smaller alpha or more data")


def regmean(models, grams, alpha=DEFAULT_ALPHA, *, subset=DEFAULT_SUBSET, keep: int = 0):
    """RegMean merge of stacked `models` (a leading model axis, `merge.stack`) with their stacked
    Grams (a `Grams` or its nested `gram` dict, same model order): inside `subset`, every trunk
    Linear kernel is ``(sum_i G~_i)^-1 sum_i G~_i W_i`` and every other leaf the plain mean;
    outside it, model `keep`'s values. Pure and jittable; vmappable over `alpha` (in [0, 1],
    checked when concrete). Concrete singular Gram sums raise `MergeError` naming the layer."""
    M.check_coefficient("alpha", alpha, 0.0, 1.0)
    n = M.num_models(models)
    if not isinstance(keep, int) or not 0 <= keep < n:
        raise M.MergeError(f"keep must be a model index in [0, {n}), got {keep!r}")
    gmap = flat_grams(grams)
    one = M.first_model(models)
    mask = M.subset_mask(one, subset)
    leaves = trees.flatten(models)
    for path, G in gmap.items():
        W = leaves.get(f"{path}/kernel")
        if W is None:
            raise M.MergeError(f"grams: {path} is not a Linear of the models (no {path}/kernel)")
        want = (n, W.shape[-2], W.shape[-2])
        if tuple(G.shape) != want:
            raise M.MergeError(f"grams: {path} has shape {tuple(G.shape)}, expected {want} "
                               f"({n} models x (in, in) for a kernel {tuple(W.shape[1:])})")
        trees.check_finite({path: G}, error=M.MergeError, where="grams")
    trunk_linear = tuple(f"block_*/{name}/kernel" for name in TRUNK_LINEARS)

    def leaf(p, m, x):
        path = subsets.path_str(p)
        if not m:
            return x[keep]
        module = path.rsplit("/", 1)[0]
        if path.endswith("/kernel") and module in gmap:
            merged, A, diag = _regmean_leaf(x, gmap[module], alpha)
            if all(M.is_concrete(v) for v in (merged, A, alpha)):
                _check_solvable(module, A, diag, merged, alpha)
            return merged
        if subsets.matches(path, trunk_linear):
            raise M.MergeError(f"grams: no Gram for the trunk Linear {module} (compute_grams covers every one)")
        return jnp.mean(x, axis=0).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(lambda p, m, x: leaf(p, m, x), mask, models)


# ----------------------------------------------------------------------------------- artifacts

FORMAT = "mdt_jax.grams"
FORMAT_VERSION = 1
META_FILE = "grams.json"
ARRAYS = "grams"


def _check_values(gmap: dict, where: str) -> None:
    for path, G in gmap.items():
        G = np.asarray(G)
        if G.ndim != 2 or G.shape[0] != G.shape[1]:
            raise GramError(f"{where}: the Gram at {path} is not square: shape {G.shape}")
        if not np.all(np.isfinite(G)):
            raise GramError(f"{where}: non-finite Gram values at {path}")
        if np.any(np.diagonal(G) < 0):
            raise GramError(f"{where}: negative diagonal Gram values at {path}")
        if not np.allclose(G, G.T, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(G).max()))):
            raise GramError(f"{where}: the Gram at {path} is not symmetric")


def save_grams(directory, grams: Grams, metadata: dict | None = None) -> str:
    """Atomically write one model's Grams to `directory` (refused if it exists and is non-empty)."""
    import json

    directory = os.path.abspath(os.fspath(directory))
    if np.ndim(grams.n_tokens):
        raise GramError(f"save_grams: one model's Grams only (n_tokens has shape {np.shape(grams.n_tokens)}); "
                        "index the stacked result first")
    gmap = flat_grams(grams)
    if not gmap:
        raise GramError("save_grams: no Gram matrices")
    _check_values(gmap, f"save_grams({directory})")
    if int(grams.n_tokens) <= 0:
        raise GramError(f"save_grams: n_tokens must be positive, got {int(grams.n_tokens)}")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "n_tokens": int(grams.n_tokens),
            "n_batches": int(grams.n_batches), "layers": sorted(gmap), "metadata": metadata or {}}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise GramError(f"save_grams: metadata is not JSON-serialisable: {e}") from None
    return write_dir_atomic(directory, {ARRAYS: orbax_writer(grams.gram),
                                        META_FILE: lambda p: write_json_atomic(p, meta)})


def load_grams(directory) -> tuple[Grams, dict]:
    """(Grams, metadata) from a `save_grams` folder; refuses anything that is not a complete Gram
    artifact of square, finite, symmetric matrices with a non-negative diagonal (naming the path)."""
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, META_FILE)
    meta = read_header(directory, META_FILE, FORMAT, FORMAT_VERSION, GramError, "Gram artifact")
    for k in ("n_tokens", "n_batches"):
        if not isinstance(meta.get(k), int) or isinstance(meta.get(k), bool) or meta[k] <= 0:
            raise GramError(f"{path}: {k} must be a positive int, got {meta.get(k)!r}")
    adir = os.path.join(directory, ARRAYS)
    tree = orbax_read(adir, GramError, "Gram artifact")
    gmap = flat_grams(tree)
    if sorted(gmap) != meta.get("layers"):
        raise GramError(f"{path}: layers {meta.get('layers')} do not match the stored arrays {sorted(gmap)}")
    _check_values(gmap, adir)
    return Grams(gram=tree, n_tokens=jnp.int32(meta["n_tokens"]), n_batches=meta["n_batches"]), \
        meta.get("metadata") or {}


# -------------------------------------------------------------------- edge: config -> Gram files

@dataclasses.dataclass(frozen=True)
class GramRun:
    """One Gram computation (configs/gram.py's fields, typed; see that file)."""

    checkpoint: str = ""
    dataset: tuple[str, ...] = ()
    num_batches: int = 100
    batch_size: int = 64
    spec_info: bool = True
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.dataset, str):
            raise TypeError("GramRun.dataset: a tuple of dataset specs, not a string")
        object.__setattr__(self, "dataset", tuple(self.dataset))


def gram_run(config: GramRun, workdir: str) -> str:
    """Run configs/gram.py: the trunk Linears' input Grams of a checkpoint on its dataset(s) ->
    `workdir` (grams/ + grams.json); returns a one-line summary."""
    from mdt_jax import checkpoint
    from mdt_jax.data.loading import model_task_data

    for f in ("num_batches", "batch_size"):
        if not isinstance(getattr(config, f), int) or getattr(config, f) <= 0:
            raise ValueError(f"config.{f}: must be a positive int, got {getattr(config, f)!r}")
    if not config.checkpoint:
        raise ValueError("config.checkpoint: no model checkpoint given")
    datasets = list(config.dataset)
    if not datasets:
        raise ValueError("config.dataset: no dataset given (a .hdf5/.pkl path or minari:<id>)")
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise FileExistsError(f"{workdir} already exists and is not empty; use a new --workdir")
    model = checkpoint.load(config.checkpoint)
    cfg, params = model.cfg, model.params
    common = dict(num_batches=config.num_batches, batch_size=config.batch_size, rng=jax.random.key(config.seed))
    tasks, data, task = model_task_data(model, datasets, one_task=bool(config.spec_info))
    result = compute_grams(cfg, params, data, **({"task": task} if task else {}), **common)
    result = jax.device_get(result)
    record = {"checkpoint": os.path.abspath(config.checkpoint), "datasets": datasets, "tasks": tasks,
              "spec_info": bool(config.spec_info), "seed": int(config.seed), "batch_size": int(config.batch_size),
              "num_batches_per_task": int(config.num_batches)}
    out = save_grams(workdir, result, record)
    conds = {p: float(np.linalg.cond(np.asarray(g, np.float64))) for p, g in flat_grams(result).items()}
    worst = max(conds, key=conds.get)
    return (f"Grams of {len(conds)} trunk Linears over {result.n_batches} batches x {config.batch_size} "
            f"({int(result.n_tokens)} tokens) on {','.join(map(str, tasks))}; largest condition number "
            f"{conds[worst]:.3g} at {worst} -> {out}")
