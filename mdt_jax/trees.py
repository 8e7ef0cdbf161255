"""One mechanism per tree concept: flatten, mask by subset, check against shapes, check finite.

Params (and Fishers, Grams, task vectors) are plain nested dicts. A leaf's *path* is its keys
joined by '/' (`path_str`), e.g. ``block_0/attn/c_attn/kernel``; every module that needs
paths, a mask, a shape check or a finiteness check calls the functions here, so each error names
the offending path the same way everywhere.

- `flatten(tree)` -> ``{path: leaf}`` in leaf order; `unflatten(flat)` -> nested dicts again;
  `paths`, `get_path`, `set_path`.
- `mask(tree, subset)` -> a bool tree: None (all), path patterns / aliases (`subsets.select`), or
  a bool tree of the same structure. `where(mask, a, b)` takes a's leaves where the mask is True,
  b's elsewhere; `pick(tree, mask)` the selected leaves as a nested dict; `overlay(tree, part)`
  puts them back.
- `shapes(tree)` -> ``{path: shape}`` (or (shape, dtype)); `shape_problems(want, got)` lists
  every missing, extra and mis-shaped path; `check_shapes` raises them.
- `first_nonfinite(tree)` / `check_finite(tree)`: the first leaf (in path order) holding a NaN or
  inf and, for a tree stacked on a leading model axis, the first model holding it.

Checks take the caller's error class (`error=`, a ValueError subclass such as `merge.MergeError`)
so each module keeps raising its own. Traced leaves (inside jit/vmap) are not value-checked.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

Subset = Any  # None | str | Sequence[str] | bool pytree


# ----------------------------------------------------------------------------------- flatten

def path_str(path, sep: str = "/") -> str:
    """A jax key path as 'a/b/c' (dict keys, attribute names; other keys as jax prints them)."""
    return sep.join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def flatten(tree, *, sep: str = "/") -> dict[str, Any]:
    """{path: leaf} in `jax.tree.leaves` order; path = the keys joined by `sep` ('/' by default)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {path_str(p, sep): x for p, x in flat}
    if len(out) != len(flat):
        raise ValueError(f"tree has {len(flat)} leaves but only {len(out)} distinct paths (a key contains {sep!r}?)")
    return out


def paths(tree) -> list[str]:
    """Every leaf's path, in leaf order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def set_path(tree: dict, path: str, value, *, sep: str = "/") -> None:
    """tree[k0][k1]...[kn] = value for path 'k0/k1/.../kn', creating the dicts on the way."""
    *parents, leaf = path.split(sep)
    for k in parents:
        tree = tree.setdefault(k, {})
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: {k!r} is a leaf, not a dict")
    tree[leaf] = value


def get_path(tree, path: str, *, sep: str = "/"):
    """tree[k0][k1]...[kn] for path 'k0/k1/.../kn' (KeyError naming the path if absent)."""
    node = tree
    for k in path.split(sep):
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError(f"no {path} in the tree (stopped at {k!r})")
        node = node[k]
    return node


def unflatten(flat: Mapping[str, Any], *, sep: str = "/") -> dict:
    """Nested dicts from {path: leaf}: the inverse of `flatten` for nested-dict trees."""
    out: dict = {}
    for path, x in flat.items():
        set_path(out, path, x, sep=sep)
    return out


# ----------------------------------------------------------------------------- mask by subset

def is_patterns(subset) -> bool:
    return isinstance(subset, str) or (isinstance(subset, (list, tuple)) and all(isinstance(s, str) for s in subset))


def mask(tree, subset: Subset, *, error: type[Exception] = ValueError, what: str = "subset"):
    """A bool tree shaped like `tree`: all True for None, `subsets.select` for path patterns or
    aliases (a pattern matching nothing is a ValueError), or `subset` itself if it is a bool tree
    with the structure of `tree` (else `error`)."""
    if subset is None:
        return jax.tree.map(lambda _: True, tree)
    if is_patterns(subset):
        from mdt_jax import subsets  # subsets builds on this module
        return subsets.select(tree, subset)
    if jax.tree.structure(subset) != jax.tree.structure(tree):
        raise error(f"{what}: a bool mask tree must have the structure of the params; the mask has paths "
                    f"{paths(subset)[:3]}..., the params {paths(tree)[:3]}...")
    return subset


def where(m, a, b):
    """Leaf by leaf: a's where the bool tree `m` is True, b's elsewhere (a static choice)."""
    return jax.tree.map(lambda s, x, y: x if s else y, m, a, b)


def pick(tree, m, *, error: type[Exception] = ValueError) -> dict:
    """The leaves of the nested dict `tree` where the bool tree `m` is True, as a nested dict."""
    out: dict = {}
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(m)):
        if not s:
            continue
        keys = [getattr(k, "key", None) for k in path]
        if any(k is None for k in keys):
            raise error(f"params must be nested dicts; got a non-dict node at {path_str(path)}")
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = x
    return out


def overlay(tree, part):
    """`tree` with the leaves present in the nested dict `part` replaced by part's."""
    if not isinstance(part, dict):
        return part
    return {k: (overlay(v, part[k]) if k in part else v) for k, v in tree.items()}


def count_selected(m) -> int:
    """How many leaves the bool tree `m` selects."""
    return sum(bool(s) for s in jax.tree.leaves(m))


# ------------------------------------------------------------------------ check against shapes

def leaf_shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def shapes(tree, *, dtypes: bool = False, lead: int = 0) -> dict[str, Any]:
    """{path: shape} of every leaf (arrays, ShapeDtypeStructs), or {path: (shape, dtype)} with
    `dtypes` (a leaf without a dtype counts as float32). `lead` drops that many leading axes (the
    model axis of a stacked tree)."""
    def spec(x):
        s = leaf_shape(x)[lead:]
        return (s, np.dtype(getattr(x, "dtype", np.float32))) if dtypes else s
    return {p: spec(x) for p, x in flatten(tree).items()}


def _spec(s) -> str:
    if isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], np.dtype):
        return f"{s[1]}{s[0]}"
    return str(s)


def shape_problems(want: Mapping[str, Any], got: Mapping[str, Any], *, want_name: str | None = None,
                   got_name: str | None = None) -> list[str]:
    """Every path of `want` missing from `got`, every path only in `got`, then every path whose
    shape (or (shape, dtype)) differs, each group sorted by path. Without names, `want` is the
    expected layout ("p: shape (..), expected (..)"); with them, two trees are compared
    ("p: base has (..), finetunes has (..)")."""
    where = f" in {got_name}" if got_name else ""
    problems = [f"missing {p} {_spec(want[p])}{where}" for p in sorted(set(want) - set(got))]
    problems += [f"unexpected {p} {_spec(got[p])}" + (f", only in {got_name}" if got_name else "")
                 for p in sorted(set(got) - set(want))]
    for p in sorted(set(want) & set(got)):
        if want[p] != got[p]:
            problems.append(f"{p}: {want_name or 'expected'} has {_spec(want[p])}, {got_name} has {_spec(got[p])}"
                            if got_name else f"{p}: shape {_spec(got[p])}, expected {_spec(want[p])}")
    return problems


def raise_problems(problems: Sequence[str], error: type[Exception], prefix: str, limit: int = 20) -> None:
    """Raise error("prefix: p1; p2; ... (+n more)") if there are any problems."""
    if problems:
        raise error(f"{prefix}: " + "; ".join(problems[:limit])
                    + (f" (+{len(problems) - limit} more)" if len(problems) > limit else ""))


def check_shapes(tree, want: Mapping[str, Any], *, error: type[Exception] = ValueError,
                 prefix: str = "params do not fit", dtypes: bool = False, limit: int = 20) -> None:
    """Raise `error` listing every path of `tree` missing, extra or shaped differently from
    `want` ({path: shape}, or {path: (shape, dtype)} with `dtypes`; e.g. `shapes(reference)`)."""
    raise_problems(shape_problems(want, shapes(tree, dtypes=dtypes)), error, prefix, limit)


# ------------------------------------------------------------------------------- check finite

def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def first_nonfinite(tree, *, stacked: bool = False) -> tuple[str, int | None] | None:
    """(path, model index or None) of the first leaf, in leaf order, holding a NaN or inf; with
    `stacked` the index is the first model (leading axis) holding one. None when all are finite
    (traced leaves are skipped)."""
    for p, x in flatten(tree).items():
        if not _concrete(x):
            continue
        bad = ~np.isfinite(np.asarray(x))
        if bad.any():
            if not stacked or bad.ndim == 0:
                return p, None
            return p, int(np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1)))
    return None


def check_finite(tree, *, error: type[Exception] = ValueError, where: str = "", what: str | None = None,
                 names: Sequence[str] | None = None, kind: str = "values") -> None:
    """Raise error("{where}: non-finite {kind} in {what} at {path}") for the first non-finite leaf
    (each part only when given).

    With `names`, `tree` is stacked on a leading model axis and `what` becomes the name of the
    first model holding the value (e.g. "non-finite values in finetune 1 at block_0/ln_1/scale").
    """
    hit = first_nonfinite(tree, stacked=names is not None)
    if hit is None:
        return
    path, i = hit
    who = names[i] if names is not None and i is not None else what
    raise error((f"{where}: " if where else "") + f"non-finite {kind}" + (f" in {who}" if who else "") + f" at {path}")


def check_nonnegative(tree, *, error: type[Exception] = ValueError, where: str = "", what: str | None = None,
                      kind: str = "values") -> None:
    """Raise error("{where}: negative {kind} in {what} at {path}") for the first leaf holding a value < 0."""
    for p, x in flatten(tree).items():
        if _concrete(x) and np.any(np.asarray(x) < 0):
            raise error((f"{where}: " if where else "") + f"negative {kind}" + (f" in {what}" if what else "")
                        + f" at {p}")
