"""Merge methods as pure pytree functions: jittable, and vmappable over their coefficients.

Models are *stacked*: every leaf carries a leading model axis M (`stack([p0, p1, p2])`, which also
checks that the trees match and lists every mismatched path). Each method merges only the leaves
selected by `subset` (path patterns or aliases from `mdt_jax.subsets`, or a bool tree; None means
all) and takes every other leaf from a reference model: model `keep` (default 0, as the
reference's single-task merge takes LNs, embeddings and heads from model 0) or `base` for the
task-vector methods.

Methods:
- `weighted_average(models, weights)`: sum_i w_i theta_i, uniform by default.
- `lerp(a, b, p)`: a + p (b - a).
- `fisher_weighted(models, fishers)`: sum_i (f_i / sum_j f_j) theta_i with f_i = F_i / trace_i
  (trace normalisation on, as the reference; the trace over the whole Fisher tree, the trunk, as
  the reference) or F_i. The reference's formula exactly wherever it is finite; only its 0/0s are
  guarded (the plain average there); `floor=0` reproduces the reference's NaNs too.
- `task_arithmetic(base, models, lam)`: base + lam * sum_i (theta_i - base).
- `ties(base, models, k, lam)`: trim each task vector to its top-k fraction by magnitude, elect a
  sign per parameter by the sign of the summed trimmed vectors, average the entries that agree
  with it (disjoint mean), base + lam * that (Yadav et al., 2023).
- `dare(base, models, p, rng)`: drop each task-vector entry with probability p and rescale the
  rest by 1 / (1 - p) (Yu et al., 2023); feed the result to `task_arithmetic` or `ties`.
- "regmean" (`mdt_jax.regmean.regmean(models, grams, alpha)`): each trunk Linear kernel by
  (sum_i G~_i)^-1 sum_i G~_i W_i from the models' input Grams (Jin et al., 2023).

Coefficients are arrays, so ``jax.vmap(lambda p: lerp(a, b, p))(ps)`` gives a whole sweep of
candidates stacked on a leading axis, ready for `mdt_jax.evaluate.evaluate`. Out-of-range
coefficients are refused when they are concrete (outside jit/vmap).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import subsets
from mdt_jax import trees

Subset = Any  # None | str | Sequence[str] | bool pytree


class MergeError(ValueError):
    """Models (or Fishers) that cannot be merged, or a bad coefficient."""


def check_compatible(pytrees: Sequence, names: Sequence[str] | None = None) -> None:
    """Raise MergeError listing every path missing from, or shaped differently in, some tree."""
    if len(pytrees) < 1:
        raise MergeError("no models to merge")
    names = list(names or [f"model {i}" for i in range(len(pytrees))])
    ref = trees.shapes(pytrees[0])
    problems = [q for name, t in zip(names[1:], pytrees[1:])
                for q in trees.shape_problems(ref, trees.shapes(t), want_name=names[0], got_name=name)]
    trees.raise_problems(problems, MergeError, "models do not match")


def stack(pytrees: Sequence, names: Sequence[str] | None = None):
    """Stack matching pytrees on a new leading model axis."""
    names = list(names or [f"model {i}" for i in range(len(pytrees))])
    check_compatible(pytrees, names)
    for name, t in zip(names, pytrees):
        trees.check_finite(t, error=MergeError, what=name)
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *pytrees)


def unstack(stacked) -> list:
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x: x[i], stacked) for i in range(n)]


def first_model(stacked):
    return jax.tree.map(lambda x: x[0], stacked)


def subset_mask(params, subset: Subset):
    """A bool tree over `params` (one model, no leading axis) from patterns, a bool tree, or None (all)."""
    return trees.mask(params, subset, error=MergeError)


def merged_fraction(params, subset: Subset) -> float:
    """Fraction of the scalar parameters of one model that a merge with `subset` changes."""
    return subsets.fraction(params, subset_mask(params, subset))


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_coefficient(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    if not is_concrete(value):
        return
    v = np.asarray(value, np.float64)
    if not np.all(np.isfinite(v)):
        raise MergeError(f"{name} must be finite, got {value}")
    if lo is not None and np.any(v <= lo if lo_open else v < lo):
        raise MergeError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and np.any(v >= hi if hi_open else v > hi):
        raise MergeError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value}")


def num_models(stacked) -> int:
    sizes = {x.shape[0] if x.ndim else -1 for x in jax.tree.leaves(stacked)}
    if len(sizes) != 1 or -1 in sizes:
        raise MergeError("models must be stacked on a leading axis (use merge.stack([...]))")
    return sizes.pop()


def weighted_average(models, weights=None, *, subset: Subset = None, keep: int = 0):
    """sum_i w_i theta_i on `subset` (w uniform by default, else normalised to sum 1)."""
    M = num_models(models)
    if weights is None:
        w = jnp.full((M,), 1.0 / M)
    else:
        check_coefficient("weights", weights, 0.0)
        w = jnp.asarray(weights, jnp.float32)
        if w.shape != (M,):
            raise MergeError(f"weights must have shape ({M},), got {w.shape}")
        if is_concrete(w) and float(w.sum()) <= 0:
            raise MergeError(f"weights must not all be zero, got {weights}")
        w = w / w.sum()
    mask = subset_mask(first_model(models), subset)
    return jax.tree.map(lambda m, x: jnp.tensordot(w, x, axes=1).astype(x.dtype) if m else x[keep], mask, models)


def lerp(a, b, p, *, subset: Subset = None):
    """a + p (b - a) on `subset`, `a` elsewhere; p in [0, 1]."""
    check_coefficient("p", p, 0.0, 1.0)
    check_compatible([a, b], ["a", "b"])
    mask = subset_mask(a, subset)
    return jax.tree.map(lambda m, x, y: x + p * (y - x) if m else x, mask, a, b)


TRACE_SCOPES = ("fisher", "subset")


def fisher_weighted(models, fishers, *, normalize_trace: bool = True, trace_over: str = "fisher",
                    floor: float | None = None, subset: Subset = None, keep: int = 0):
    """Fisher-weighted average: sum_i (f_i / sum_j f_j) theta_i with f_i = F_i / trace_i (or F_i).

    `fishers` is stacked like `models`; leaves outside `subset` are not merged.

    trace_i (with `normalize_trace`, as the reference) is the sum of F_i over
    - `trace_over="fisher"` (default, the reference): every leaf of the Fisher tree given, i.e.
      the whole trunk the Fisher was computed on (the reference's `_stats.sum` over
      `transformer.h`, LayerNorms included), even when only attn+mlp are merged;
    - `trace_over="subset"`: the merged subset only.

    Zero denominators, by `floor`:
    - None (default): the reference's formula wherever it is finite, bit for bit; only where it
      would divide by zero is it guarded: a model whose trace is 0 gets f_i = 0 (not 0/0), and an
      entry where sum_j f_j = 0 takes the plain average of the models. All-zero Fishers thus give
      the plain average.
    - 0.0: exactly the reference, NaN where it divides 0 by 0 (an all-zero Fisher, or an entry
      where every f_i is 0).
    - > 0: added to every f_i (older behaviour; it pulls every entry toward the plain average by
      an amount that grows with the model size, so it is not the default).
    """
    if trace_over not in TRACE_SCOPES:
        raise MergeError(f"trace_over must be one of {TRACE_SCOPES}, got {trace_over!r}")
    if floor is not None:
        check_coefficient("floor", floor, 0.0)
    M = num_models(models)
    check_compatible([first_model(models), first_model(fishers)], ["models", "fishers"])
    if num_models(fishers) != M:
        raise MergeError(f"{num_models(fishers)} Fishers for {M} models")
    mask = subset_mask(first_model(models), subset)
    trees.check_finite(fishers, error=MergeError, kind="Fisher values")
    trees.check_nonnegative(fishers, error=MergeError, kind="Fisher values")
    scope = [f for f, m in zip(jax.tree.leaves(fishers), jax.tree.leaves(mask)) if m or trace_over == "fisher"]
    trace = sum(jnp.sum(f.reshape(M, -1), axis=1) for f in scope) if normalize_trace else None  # (M,)
    guard = floor is None

    def merge_leaf(m, x, f):
        if not m:
            return x[keep]
        if normalize_trace:
            t = trace.reshape((M,) + (1,) * (f.ndim - 1))
            fi = jnp.where(t > 0, f / jnp.where(t > 0, t, 1.0), 0.0) if guard else f / t
        else:
            fi = f
        if floor is not None and (not is_concrete(floor) or float(floor) > 0):
            fi = fi + floor
        num, den = jnp.sum(fi * x, axis=0), jnp.sum(fi, axis=0)
        if not guard:
            return (num / den).astype(x.dtype)
        ok = den > 0
        return jnp.where(ok, num / jnp.where(ok, den, 1.0), jnp.mean(x, axis=0)).astype(x.dtype)

    return jax.tree.map(merge_leaf, mask, models, fishers)


def task_vectors(base, models):
    """theta_i - base for every stacked model."""
    check_compatible([base, first_model(models)], ["base", "models"])
    return jax.tree.map(lambda b, x: x - b[None], base, models)


def task_arithmetic(base, models, lam=1.0, *, subset: Subset = None):
    """base + lam * sum_i (theta_i - base) on `subset`, base elsewhere; lam >= 0."""
    check_coefficient("lam", lam, 0.0)
    tv = task_vectors(base, models)
    return jax.tree.map(lambda m, b, t: b + lam * jnp.sum(t, axis=0) if m else b, subset_mask(base, subset), base, tv)


def ties_keep_count(n: int, k) -> int:
    """How many of n entries the original TIES code keeps for density k (`topk_values_mask`).

    It takes the (n - int(n * k))-th smallest magnitude as the threshold and keeps every entry at
    or above it: int(n * k) + 1 entries when magnitudes are distinct (n entries at most). int() is
    computed in float64 on the Python float k, as there.
    """
    return int(min(n, int(n * float(k)) + 1))


def _topk_threshold(tv, mask, k):
    """Per model: the magnitude threshold of the original TIES trim over its selected leaves.

    The threshold is the kth-largest |entry| with kth = `ties_keep_count(n, k)`; entries with
    |entry| >= it are kept. For a concrete k the count is computed in float64 as the original
    does; for a traced k (a vmapped sweep) as floor(k * n) + 1 in float32, which can differ by one
    where k * n is within float32 rounding of an integer (sweep k in Python to avoid it). Exact,
    without sorting: non-negative float32s order like their int32 bit patterns, so a 31-step
    bisection on the bits, each step one counting pass, finds the threshold. Magnitudes of other
    dtypes (float16, int) are compared as float32s.
    """
    bits = [jax.lax.bitcast_convert_type(jnp.abs(t).astype(jnp.float32), jnp.int32).reshape(t.shape[0], -1)
            for t, m in zip(jax.tree.leaves(tv), jax.tree.leaves(mask)) if m]
    n = sum(b.shape[1] for b in bits)
    if is_concrete(k):
        kth = jnp.asarray(ties_keep_count(n, k), jnp.int32)
    else:
        kth = jnp.clip(jnp.floor(k * n) + 1, 1, n).astype(jnp.int32)
    count_ge = lambda t: sum(jnp.sum(b >= t[:, None], axis=1, dtype=jnp.int32) for b in bits)

    def step(_, lohi):  # invariant: count(bits >= lo) >= kth > count(bits >= hi + 1)
        lo, hi = lohi
        mid = lo + (hi - lo + 1) // 2
        ok = count_ge(mid) >= kth
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    M = bits[0].shape[0]
    lo, _ = jax.lax.fori_loop(0, 31, step, (jnp.zeros((M,), jnp.int32), jnp.full((M,), 0x7F800000, jnp.int32)))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def ties(base, models, k=0.2, lam=1.0, *, subset: Subset = None):
    """TIES-merging (Yadav et al., 2023), as the original code (`ties_merging`) computes it.

    1. Trim: per model, one global top-k over every entry of its task vector in `subset` (the
       TIES paper's and original code's flattened vector; mergekit instead trims each tensor on
       its own), keeping `ties_keep_count(n, k)` entries (ties at the threshold kept too).
    2. Elect: sign(sum_i trimmed_i) per entry; where that sum is exactly 0, the majority sign,
       sign(sum over all entries of the elected signs), as the original's `resolve_zero_signs`.
    3. Disjoint mean: per entry, the mean of the trimmed entries that are > 0 where the elected
       sign is positive, < 0 elsewhere (the original's `torch.where(sign > 0, T > 0, T < 0)`),
       divided by max(count, 1).
    Returns base + lam * that on `subset`, base elsewhere. k in (0, 1] (k = 1 keeps everything;
    the original fails there).
    """
    check_coefficient("k", k, 0.0, 1.0, lo_open=True)
    check_coefficient("lam", lam, 0.0)
    tv = task_vectors(base, models)
    mask = subset_mask(base, subset)
    M = num_models(models)
    if not any(bool(m) for m in jax.tree.leaves(mask)):
        return base  # nothing to merge, as every other method does with an empty subset
    thr = _topk_threshold(tv, mask, k)
    trimmed = [jnp.where(jnp.abs(t) >= thr.reshape((M,) + (1,) * (t.ndim - 1)), t, 0.0) if m else None
               for t, m in zip(jax.tree.leaves(tv), jax.tree.leaves(mask))]
    signs = [jnp.sign(jnp.sum(t, axis=0)) if t is not None else None for t in trimmed]
    majority = jnp.sign(sum(jnp.sum(s) for s in signs if s is not None))

    def leaf(b, t, s):
        if t is None:
            return b
        s = jnp.where(s == 0, majority, s)
        keep = jnp.where(s[None] > 0, t > 0, t < 0)
        picked = jnp.where(keep, t, 0.0)
        mean = jnp.sum(picked, axis=0) / jnp.maximum(jnp.sum(picked != 0, axis=0), 1)
        return b + lam * mean

    out = [leaf(b, t, s) for b, t, s in zip(jax.tree.leaves(base), trimmed, signs)]
    return jax.tree.unflatten(jax.tree.structure(base), out)


def dare(base, models, p, rng, *, rescale: bool = True, subset: Subset = None):
    """Models whose task vectors had each entry dropped with probability p (and the rest scaled by
    1/(1-p) when `rescale`), stacked like `models`; merge them with task_arithmetic or ties."""
    check_coefficient("p", p, 0.0, 1.0, hi_open=True)
    tv = task_vectors(base, models)
    mask = subset_mask(base, subset)
    leaves, treedef = jax.tree.flatten(tv)
    keys = jax.random.split(rng, len(leaves))
    scale = 1.0 / (1.0 - p) if rescale else 1.0
    out = [b[None] + (jnp.where(jax.random.bernoulli(key, 1.0 - p, t.shape), t * scale, 0.0) if m else t)
           for b, t, m, key in zip(jax.tree.leaves(base), leaves, jax.tree.leaves(mask), keys)]
    return jax.tree.unflatten(treedef, out)


METHODS = ("average", "fisher", "task_arithmetic", "ties", "dare_ta", "dare_ties", "regmean")


def merge(method: str, models, *, base=None, fishers=None, grams=None, subset: Subset = None, rng=None, **coeffs):
    """Dispatch by name (CLI/config use). `models` stacked; `base` for the task-vector methods;
    `grams` (stacked like `models`) for regmean."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose from {METHODS}")
    needs_base = method in ("task_arithmetic", "ties", "dare_ta", "dare_ties")
    if needs_base and base is None:
        raise MergeError(f"merge method {method!r} needs a base model (the pre-finetuning weights)")
    allowed = {"average": {"weights", "keep"}, "fisher": {"normalize_trace", "trace_over", "floor", "keep"},
               "task_arithmetic": {"lam"}, "ties": {"k", "lam"}, "dare_ta": {"p", "lam", "rescale"},
               "dare_ties": {"p", "k", "lam", "rescale"}, "regmean": {"alpha", "keep"}}[method]
    unknown = set(coeffs) - allowed
    if unknown:
        raise MergeError(f"merge method {method!r} takes {sorted(allowed)}, not {sorted(unknown)}")
    if method == "average":
        return weighted_average(models, subset=subset, **coeffs)
    if method == "fisher":
        if fishers is None:
            raise MergeError("merge method 'fisher' needs Fishers")
        return fisher_weighted(models, fishers, subset=subset, **coeffs)
    if method == "regmean":
        if grams is None:
            raise MergeError("merge method 'regmean' needs Grams (mdt_jax.regmean.compute_grams)")
        from mdt_jax.regmean import regmean
        return regmean(models, grams, subset=subset, **coeffs)
    if method == "task_arithmetic":
        return task_arithmetic(base, models, subset=subset, **coeffs)
    if method == "ties":
        return ties(base, models, subset=subset, **coeffs)
    if rng is None:
        raise MergeError(f"merge method {method!r} needs an rng key for its drop mask")
    dropped = dare(base, models, coeffs.pop("p", 0.5), rng, rescale=coeffs.pop("rescale", True), subset=subset)
    if method == "dare_ta":
        return task_arithmetic(base, dropped, subset=subset, **coeffs)
    return ties(base, dropped, subset=subset, **coeffs)
