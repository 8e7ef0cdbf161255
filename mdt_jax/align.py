"""Permutation alignment of independently initialised DTs: Git Re-Basin weight matching.

Ainsworth, Hayase and Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries"
(ICLR 2023), Section 3.2 ("weight matching"). A transformer computes the same function after its
hidden units are permuted consistently, so before averaging, each model is permuted to look as
much like a reference model as possible. The permutation groups of a DT (see the layout in
`mdt_jax.models.dt`; kernels are (in, out), attention uses one fused q|k|v kernel ``c_attn``
(H, 3H) whose head h owns columns h*hd:(h+1)*hd of each of the q, k and v thirds):

- **residual** (H,): one permutation of the residual stream shared by the whole model: the output
  columns (and biases) of ``embed_return/state/action`` and ``embed_timestep``, ``embed_ln``, every
  block's ``ln_1``/``ln_2``, the input rows of ``c_attn`` and ``mlp/c_fc``, the output columns and
  biases of ``attn/c_proj`` and ``mlp/c_proj``, ``ln_f``, and the input rows of ``predict_*``.
  LayerNorm is permutation-equivariant, so this is exact. A multi-task model's per-task
  ``task_{name}/...`` embeddings and heads take it too, and so do P1's per-task embeddings, whose
  shapes differ between tasks.
- **mlp[i]** (inner,): block i's MLP hidden units: ``c_fc`` columns and bias, ``mlp/c_proj`` rows.
- **heads[i]** (n_head,): block i's heads: the q, k and v column blocks of ``c_attn`` (and bias)
  and the matching row blocks of ``attn/c_proj``.
- **qk[i]** (n_head, hd) and **v[i]** (n_head, hd): the dims inside each head. q and k dims move
  together (q.k is unchanged); v dims move with the ``attn/c_proj`` rows. With the default of
  one head these are all of the attention's symmetry.

Convention: ``permute(cfg, params, perms)`` gathers, so unit i of the result is unit ``perm[i]``
of the input. Inside block i the within-head permutations belong to the input's heads: column
(h, d) of the q third of the result is column ``(g, qk[i][g, d])`` of the input, g = heads[i][h].

Weight matching maximises the summed correlation (Frobenius inner product)
``J(P) = sum_W <W_ref, (P W)_other>`` over the matched weights W by coordinate descent: for each
group in a random order, with every other group fixed, J is linear in that group's permutation
matrix, so the best one is a linear assignment problem on the cost matrix
``C[a, b] = sum_W <unit a of W_ref, unit b of W_other>`` (other groups applied), solved by
`scipy.optimize.linear_sum_assignment(maximize=True)`. A pass over all groups repeats until
nothing changes or `iters` passes. Each step keeps the current permutation unless the new one
scores strictly higher, so J never decreases. The weights entering each cost, among those
selected by `match_on` (default ``blocks``: the trunk blocks, which hold everything P1 merges):

- residual: ``ln_1``, ``ln_2`` (scale, bias), ``c_attn`` and ``mlp/c_fc`` rows, ``attn/c_proj``
  and ``mlp/c_proj`` columns and biases (and, if selected, ``ln_f``, the embeddings' columns and
  biases, ``embed_ln``, the heads' rows);
- mlp[i]: ``c_fc`` columns and bias, ``mlp/c_proj`` rows of block i;
- attn[i], one step for heads[i], qk[i] and v[i] of block i together: the cost of pairing ref
  head h with head g is the sum over the per-head blocks of q, k and v (``c_attn`` kernel and
  bias) and of the ``attn/c_proj`` rows, each at its best within-head permutation (one linear
  assignment over the hd dims per (h, g) for q and k jointly, one for v with the ``c_proj``
  rows); the heads are then one linear assignment on those pair costs. Solving heads and dims
  jointly is exact coordinate descent over the block's attention; alternating them as separate
  groups can stall, since a head pairing barely shows while its dims are mismatched.

Beyond the paper: besides the paper's identity start, the descent also runs from a residual
matched on permutation-invariant per-feature statistics, and the higher J of the two is kept
(`weight_matching(init='both')`, the default).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from mdt_jax import merge as M, subsets
from mdt_jax import trees
from mdt_jax.models.dt import DTConfig
from mdt_jax.pipelines import trunk


class Perms(NamedTuple):
    """One permutation per group (int arrays): see the module docstring for what each moves."""

    residual: jax.Array          # (H,)
    mlp: tuple                   # n_layer x (inner,)
    heads: tuple                 # n_layer x (n_head,)
    qk: tuple                    # n_layer x (n_head, hd): per input head, its q/k dims
    v: tuple                     # n_layer x (n_head, hd): per input head, its v dims


def _dims(cfg: DTConfig) -> tuple[int, int, int, int, int]:
    H, nh = cfg.hidden_size, cfg.n_head
    return H, cfg.n_layer, nh, H // nh, cfg.inner_dim


def identity_perms(cfg: DTConfig) -> Perms:
    H, L, nh, hd, inner = _dims(cfg)
    within = jnp.broadcast_to(jnp.arange(hd, dtype=jnp.int32), (nh, hd))
    return Perms(jnp.arange(H, dtype=jnp.int32), tuple(jnp.arange(inner, dtype=jnp.int32) for _ in range(L)),
                 tuple(jnp.arange(nh, dtype=jnp.int32) for _ in range(L)), (within,) * L, (within,) * L)


def random_perms(cfg: DTConfig, rng: jax.Array, *, within_head: bool = True) -> Perms:
    """Uniformly random permutations of every group (within-head dims identity unless `within_head`).

    Drawn on the host by numpy from the key's bits (deterministic per key, not jittable).
    """
    H, L, nh, hd, inner = _dims(cfg)
    gen = np.random.default_rng(np.asarray(jax.random.key_data(rng), np.uint32).ravel())
    perm = lambda n: jnp.asarray(gen.permutation(n), jnp.int32)
    rows = lambda: jnp.asarray(np.stack([gen.permutation(hd) for _ in range(nh)]), jnp.int32)
    ident = identity_perms(cfg)
    return Perms(perm(H), tuple(perm(inner) for _ in range(L)), tuple(perm(nh) for _ in range(L)),
                 tuple(rows() for _ in range(L)) if within_head else ident.qk,
                 tuple(rows() for _ in range(L)) if within_head else ident.v)


def compose(first: Perms, second: Perms) -> Perms:
    """The permutation c with permute(permute(p, first), second) == permute(p, c)."""
    inv = lambda h: jnp.argsort(h)
    within = lambda wa, wb, ha: jnp.take_along_axis(wa, wb[inv(ha)], axis=1)
    return Perms(first.residual[second.residual],
                 tuple(a[b] for a, b in zip(first.mlp, second.mlp)),
                 tuple(a[b] for a, b in zip(first.heads, second.heads)),
                 tuple(within(wa, wb, ha) for wa, wb, ha in zip(first.qk, second.qk, first.heads)),
                 tuple(within(wa, wb, ha) for wa, wb, ha in zip(first.v, second.v, first.heads)))


def check_perms(cfg: DTConfig, perms: Perms) -> None:
    """ValueError naming the field when a permutation has the wrong shape or is not a permutation."""
    H, L, nh, hd, inner = _dims(cfg)
    if not isinstance(perms, Perms):
        raise ValueError(f"perms must be an align.Perms, got {type(perms).__name__}")

    def one(name, x, shape):
        if np.shape(x) != shape:
            raise ValueError(f"perms.{name}: expected shape {shape}, got {np.shape(x)}")
        if isinstance(x, jax.core.Tracer):
            return
        a = np.asarray(x)
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"perms.{name}: expected integers, got {a.dtype}")
        if not np.array_equal(np.sort(a, axis=-1), np.broadcast_to(np.arange(shape[-1]), shape)):
            raise ValueError(f"perms.{name}: not a permutation of 0..{shape[-1] - 1}")

    one("residual", perms.residual, (H,))
    for field, shape in (("mlp", (inner,)), ("heads", (nh,)), ("qk", (nh, hd)), ("v", (nh, hd))):
        seq = getattr(perms, field)
        if len(seq) != L:
            raise ValueError(f"perms.{field}: expected {L} entries (one per block), got {len(seq)}")
        for i, x in enumerate(seq):
            one(f"{field}[{i}]", x, shape)


# -- which axis of which param each group moves ------------------------------------------------

_RES, _MLP, _COLS, _VROWS = "residual", "mlp", "attn_cols", "v_rows"
_TASK_IO_KERNEL_OUT = ("embed_return", "embed_state", "embed_action")


def _axes(path: tuple[str, ...]) -> dict[int, tuple[str, int]] | None:
    """{axis: (kind, block)} for a param path, or None when the path is not a DT param."""
    if path == ("embed_timestep", "embedding"):
        return {1: (_RES, -1)}
    if path and path[0].startswith("task_"):  # a multi-task model's own embeddings and heads
        path = path[1:]
    if len(path) == 2 and path[0] in _TASK_IO_KERNEL_OUT:
        return {1: (_RES, -1)} if path[1] == "kernel" else {0: (_RES, -1)} if path[1] == "bias" else None
    if len(path) == 2 and path[0] in ("embed_ln", "ln_f") and path[1] in ("scale", "bias"):
        return {0: (_RES, -1)}
    if len(path) == 2 and path[0].startswith("predict_"):
        return {0: (_RES, -1)} if path[1] == "kernel" else {} if path[1] == "bias" else None
    if len(path) >= 3 and path[0].startswith("block_") and path[0][6:].isdigit():
        i, rest = int(path[0][6:]), path[1:]
        table = {("ln_1", "scale"): {0: _RES}, ("ln_1", "bias"): {0: _RES},
                 ("ln_2", "scale"): {0: _RES}, ("ln_2", "bias"): {0: _RES},
                 ("attn", "c_attn", "kernel"): {0: _RES, 1: _COLS}, ("attn", "c_attn", "bias"): {0: _COLS},
                 ("attn", "c_proj", "kernel"): {0: _VROWS, 1: _RES}, ("attn", "c_proj", "bias"): {0: _RES},
                 ("mlp", "c_fc", "kernel"): {0: _RES, 1: _MLP}, ("mlp", "c_fc", "bias"): {0: _MLP},
                 ("mlp", "c_proj", "kernel"): {0: _MLP, 1: _RES}, ("mlp", "c_proj", "bias"): {0: _RES}}
        kinds = table.get(tuple(rest))
        return None if kinds is None else {a: (k, i) for a, k in kinds.items()}
    return None


def _flat(params) -> list[tuple[str, tuple[str, ...], jax.Array]]:
    return [(n, tuple(n.split("/")), x) for n, x in trees.flatten(params).items()]


def _index(kind: str, block: int, perms: Perms, cfg: DTConfig):
    """The gather index of a whole axis of `kind` in `block` (numpy for numpy perms, else jnp)."""
    H, _, nh, hd, _ = _dims(cfg)
    xp = np if isinstance(perms.residual, np.ndarray) else jnp
    if kind == _RES:
        return perms.residual
    if kind == _MLP:
        return perms.mlp[block]
    heads = perms.heads[block]

    def part(within):  # column (h, d) <- (heads[h], within[heads[h], d])
        return (heads[:, None] * hd + within[heads]).reshape(-1)

    if kind == _VROWS:
        return part(perms.v[block])
    qk = part(perms.qk[block])
    return xp.concatenate([qk, H + qk, 2 * H + part(perms.v[block])])


def _expected(kind: str, cfg: DTConfig) -> int:
    H, _, _, _, inner = _dims(cfg)
    return {_RES: H, _MLP: inner, _COLS: 3 * H, _VROWS: H}[kind]


def _axes_checked(cfg: DTConfig, name: str, keys, x) -> dict[int, tuple[str, int]]:
    axes = _axes(keys)
    if axes is None:
        raise ValueError(f"align: {name} is not a Decision Transformer param; cannot permute it")
    for a, (kind, block) in axes.items():
        if block >= cfg.n_layer:
            raise ValueError(f"align: {name} belongs to block {block} but the config has n_layer={cfg.n_layer}")
        if np.ndim(x) <= a or np.shape(x)[a] != _expected(kind, cfg):
            raise ValueError(f"align: {name} has shape {np.shape(x)}; axis {a} should have {_expected(kind, cfg)} "
                             f"entries for hidden_size={cfg.hidden_size}, n_inner={cfg.inner_dim}")
    return axes


def permute(cfg: DTConfig, params, perms: Perms):
    """`params` with every group of `perms` applied: the same function, its hidden units reordered.

    Works on any subtree of a DT's params (e.g. a Fisher tree over the blocks only), single- or
    multi-task; unknown paths are refused. One jitted gather program per (cfg, tree structure).
    """
    check_perms(cfg, perms)
    for name, keys, x in _flat(params):
        _axes_checked(cfg, name, keys, x)
    return _permute(cfg, params, perms)


@partial(jax.jit, static_argnums=0)
def _permute(cfg: DTConfig, params, perms: Perms):
    treedef = jax.tree.structure(params)
    out = []
    for name, keys, x in _flat(params):
        for a, (kind, block) in _axes(keys).items():
            x = jnp.take(x, _index(kind, block, perms, cfg), axis=a)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


# -- weight matching -------------------------------------------------------------------------

def _matched(ref_params, params, match_on) -> list[tuple[str, tuple[str, ...]]]:
    """(path, keys) of the weights entering the objective; MergeError if they do not match."""
    mask = {n: bool(m) for n, _, m in _flat(subsets.select(ref_params, match_on))}
    ref = {n: (k, np.shape(x)) for n, k, x in _flat(ref_params) if mask[n]}
    other = {n: np.shape(x) for n, _, x in _flat(params)}
    problems = [f"{n}: reference has {s}, other has {other.get(n, 'nothing')}"
                for n, (_, s) in ref.items() if other.get(n) != s]
    if problems:
        raise M.MergeError("align: matched weights differ: " + "; ".join(problems[:10]))
    return [(n, k) for n, (k, _) in ref.items()]


def _views(kind: str, group: str, x: np.ndarray, a: int, nh: int, hd: int) -> np.ndarray | None:
    """Axis `a` of `x` (of `kind`) as (problems, units, features) for a group of type `group`:
    (1, n, F) for residual and mlp, (nh, hd, F) per head for 'qk' and 'v' (None: not touched)."""
    x = np.moveaxis(x, a, -1).reshape(-1, x.shape[a])  # (F, n)
    F = x.shape[0]
    if group in (_RES, _MLP):
        return x.T[None]
    if kind == _VROWS:
        return None if group == "qk" else x.reshape(F, nh, hd).transpose(1, 2, 0)
    y = x.reshape(F, 3, nh, hd)
    if group == "qk":
        return y[:, :2].transpose(2, 3, 0, 1).reshape(nh, hd, -1)
    return y[:, 2].transpose(1, 2, 0)


_TOUCHES = {_RES: (_RES,), _MLP: (_MLP,), "qk": (_COLS,), "v": (_COLS, _VROWS)}


def _set(perms: Perms, group: str, block: int, value) -> Perms:
    if group == _RES:
        return perms._replace(residual=value)
    seq = list(getattr(perms, group))
    seq[block] = value
    return perms._replace(**{group: tuple(seq)})


def objective(cfg: DTConfig, ref_params, params, perms: Perms, *, match_on="blocks") -> float:
    """J = sum over the matched weights of <W_ref, W of permute(params, perms)> (float64)."""
    keys = _matched(ref_params, params, match_on)
    ref = {n: x for n, _, x in _flat(ref_params)}
    got = {n: x for n, _, x in _flat(permute(cfg, params, perms))}
    return float(sum(np.vdot(np.asarray(ref[n], np.float64), np.asarray(got[n], np.float64)) for n, _ in keys))


def _lsa(C: np.ndarray) -> tuple[np.ndarray, float]:
    cols = linear_sum_assignment(C, maximize=True)[1]
    return cols, float(C[np.arange(len(cols)), cols].sum())


def _better(new: float, cur: float, scale: float) -> bool:
    """new > cur by more than float64 rounding of sums of |C| (ties keep the current perm)."""
    return new > cur + 1e-12 * scale


def _score(C: np.ndarray, perm: np.ndarray) -> float:
    return float(C[np.arange(len(perm)), perm].sum())


def weight_matching(cfg: DTConfig, ref_params, params, *, iters: int = 100, seed: int = 0,
                    match_on="blocks", within_head: bool = True, init: str = "both",
                    progress_fn: Callable[[int, str, float], None] | None = None) -> Perms:
    """Permutations P maximising J(P) = sum_W <W_ref, (P W)_params> over the `match_on` weights.

    Coordinate descent (Ainsworth et al. 2023, Algorithm 1) over the groups residual, mlp[i] and
    attn[i], in an order shuffled by `seed` on every pass; stops after a pass that changes nothing,
    or after `iters` passes. Each group is solved exactly with the others fixed:

    - residual, mlp[i]: one linear assignment on C[a, b] = sum_W <unit a of W_ref, unit b of W>;
    - attn[i]: the heads and, with `within_head`, the dims inside them, jointly. Pairing ref head
      h with head g scores S[h, g] = max_sigma <qk_h, qk_g o sigma> + max_tau <v_h, v_g o tau>,
      each max one linear assignment over the hd dims (q and k columns for sigma; v columns and
      ``attn/c_proj`` rows for tau); the heads are then a linear assignment on S. Without
      `within_head` the dims stay in place (S uses the identity sigma, tau).

    A step keeps the current permutation unless the new one scores strictly higher, so J never
    decreases. `init`: 'identity' starts every group at the identity, as the paper does; 'stats'
    first sets the residual by matching, for each residual feature, statistics that no other
    group changes (its values in 1-D weights, the norms of its rows or columns in the others,
    each centred over the features); from the identity the descent often misses even an exact
    permuted copy, since a residual mismatch makes every other group's cost noise. 'both'
    (default) runs from each start and keeps the result with the higher J (ties: 'stats').
    `progress_fn(pass, group, J)` is called after each step (with 'both', for both runs, 'stats'
    first). Returns the Perms for `params`.
    """
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if init not in ("stats", "identity", "both"):
        raise ValueError(f"init must be 'stats', 'identity' or 'both', got {init!r}")
    M.check_compatible([trunk(ref_params), trunk(params)], ["reference", "other"])
    _check_trunk(cfg, ref_params, "reference")
    _check_trunk(cfg, params, "other")
    keys = _matched(ref_params, params, match_on)
    trees.check_finite(ref_params, where="align", what="the reference model")
    trees.check_finite(params, where="align", what="the other model")
    ref = {n: np.asarray(x, np.float64) for n, _, x in _flat(ref_params)}
    other = {n: np.asarray(x, np.float64) for n, _, x in _flat(params)}
    axes = {n: _axes_checked(cfg, n, k, ref[n]) for n, k in keys}
    H, L, nh, hd, _ = _dims(cfg)
    groups = [(_RES, -1)] + [(_MLP, i) for i in range(L)] + [("attn", i) for i in range(L)]

    def cost(group, block, current):
        """Cost tensors of `group` (residual, mlp, qk or v) with that group unpermuted in `other`."""
        C = None
        for n in axes:
            for a, (kind, blk) in axes[n].items():
                if kind not in _TOUCHES[group] or (group != _RES and blk != block):
                    continue
                xo = _np_take(cfg, other[n], {b: kb for b, kb in axes[n].items() if b != a}, current)
                vr, vo = _views(kind, group, ref[n], a, nh, hd), _views(kind, group, xo, a, nh, hd)
                if vr is None:
                    continue
                # residual/mlp: (1, n, n); qk/v: every (ref head, other head) pair (nh, nh, hd, hd)
                c = np.einsum("bif,bjf->bij", vr, vo) if group in (_RES, _MLP) else \
                    np.einsum("hif,gjf->hgij", vr, vo)
                C = c if C is None else C + c
        return C

    def total(p):
        return float(sum(np.vdot(ref[n], _np_take(cfg, other[n], axes[n], p)) for n in axes))

    def attn_step(perms, block):
        base = _set(_set(_set(perms, "heads", block, np.arange(nh)), "qk", block, np.tile(np.arange(hd), (nh, 1))),
                    "v", block, np.tile(np.arange(hd), (nh, 1)))
        parts = [(f, c) for f in ("qk", "v") if (c := cost(f, block, base)) is not None]
        if not parts:
            return perms, False
        sols = []  # per part: the best within-head perm and its score for each (ref head, other head)
        for _, C in parts:
            if within_head:
                sols.append([[_lsa(C[h, g]) for g in range(nh)] for h in range(nh)])
            else:
                sols.append([[(np.arange(hd), float(np.trace(C[h, g]))) for g in range(nh)] for h in range(nh)])
        S = sum(np.array([[s[h][g][1] for g in range(nh)] for h in range(nh)]) for s in sols)
        heads, new_score = _lsa(S)
        cur = perms.heads[block]
        cur_score = sum(_score(C[h, cur[h]], getattr(perms, f)[block][cur[h]]) for f, C in parts for h in range(nh))
        if not _better(new_score, cur_score, sum(np.abs(C).sum() for _, C in parts)):
            return perms, False
        out = _set(perms, "heads", block, heads)
        for (f, _), s in zip(parts, sols):
            w = np.empty((nh, hd), np.int64)
            for h in range(nh):
                w[heads[h]] = s[h][heads[h]][0]
            out = _set(out, f, block, w)
        return out, True

    def descend(start: str) -> tuple[Perms, float]:
        perms = _host(identity_perms(cfg))
        if start == "stats":
            perms = _set(perms, _RES, -1, _stats_residual(ref, other, axes, H))
        rng = np.random.default_rng(seed)
        for it in range(iters):
            changed = False
            for gi in rng.permutation(len(groups)):
                group, block = groups[gi]
                if group == "attn":
                    perms, moved = attn_step(perms, block)
                else:
                    cur = perms.residual if group == _RES else perms.mlp[block]
                    C = cost(group, block, _set(perms, group, block, np.arange(len(cur))))
                    moved = False
                    if C is not None:
                        new, score = _lsa(C[0])
                        if _better(score, _score(C[0], cur), np.abs(C).sum()):
                            perms, moved = _set(perms, group, block, new), True
                changed |= moved
                if progress_fn is not None:
                    progress_fn(it, group if group == _RES else f"{group}[{block}]", total(perms))
            if not changed:
                break
        return perms, total(perms)

    runs = [descend(s) for s in (("stats", "identity") if init == "both" else (init,))]
    perms = max(runs, key=lambda r: r[1])[0]  # max keeps the first of equals
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), perms)


def _stats_residual(ref: dict, other: dict, axes: dict, H: int) -> np.ndarray:
    """A residual permutation from per-feature statistics that every other group leaves unchanged."""
    dr, do = [], []
    for n, ax in axes.items():
        for a, (kind, _) in ax.items():
            if kind != _RES:
                continue
            for tree, out in ((ref, dr), (other, do)):
                x = np.moveaxis(tree[n], a, 0).reshape(tree[n].shape[a], -1)
                d = x[:, 0] if x.shape[1] == 1 else np.linalg.norm(x, axis=1)
                out.append(d - d.mean())
    if not dr:
        return np.arange(H)
    return _lsa(np.stack(dr, 1) @ np.stack(do, 1).T)[0]


def _host(perms: Perms) -> Perms:
    return jax.tree.map(lambda x: np.asarray(x, np.int64), perms)


def _np_take(cfg, x, axes, perms):
    for a, (kind, block) in axes.items():
        x = np.take(x, _index(kind, block, perms, cfg), axis=a)
    return x


def _check_trunk(cfg: DTConfig, params, name: str) -> None:
    if not isinstance(cfg, DTConfig):
        raise ValueError(f"align: cfg must be a DTConfig, got {type(cfg).__name__}")
    blocks = sorted(k for k in params if k.startswith("block_"))
    if len(blocks) != cfg.n_layer:
        raise M.MergeError(f"align: the {name} model has {len(blocks)} blocks, its config n_layer={cfg.n_layer}")
    for n, k, x in _flat(trunk(params)):
        _axes_checked(cfg, f"{name} model {n}", k, x)


def align(cfg: DTConfig | Sequence[DTConfig], models: Sequence, *, ref: int = 0, iters: int = 100, seed: int = 0,
          match_on="blocks", within_head: bool = True, init: str = "both") -> tuple[list, list[Perms]]:
    """Every model permuted onto model `ref` by weight matching; returns (aligned models, perms).

    `cfg` is one DTConfig or one per model (P1's models differ in state/action dims; their trunks
    must match: H, n_layer, n_head, inner). The ref model comes back unchanged with identity perms.
    Model i is matched with seed `seed + i`; `match_on`, `within_head`, `init` as in
    `weight_matching`.
    """
    models = list(models)
    cfgs = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg] * len(models)
    if len(cfgs) != len(models):
        raise ValueError(f"align: {len(cfgs)} configs for {len(models)} models")
    if not models:
        raise M.MergeError("align: no models")
    if not isinstance(ref, int) or not 0 <= ref < len(models):
        raise ValueError(f"align: ref must be a model index in [0, {len(models)}), got {ref!r}")
    names = [f"model {i}" for i in range(len(models))]
    M.check_compatible([trunk(p) for p in models], names)
    for i, c in enumerate(cfgs):
        if not isinstance(c, DTConfig):
            raise ValueError(f"align: cfg of model {i} must be a DTConfig, got {type(c).__name__}")
        if c.n_head != cfgs[ref].n_head:
            raise M.MergeError(f"align: model {ref} has n_head={cfgs[ref].n_head}, model {i} has n_head={c.n_head}")
        _check_trunk(c, models[i], names[i])
    aligned, perms = [], []
    for i, p in enumerate(models):
        if i == ref:
            aligned.append(p)
            perms.append(identity_perms(cfgs[i]))
            continue
        pi = weight_matching(cfgs[i], models[ref], p, iters=iters, seed=seed + i, match_on=match_on,
                             within_head=within_head, init=init)
        aligned.append(permute(cfgs[i], p, pi))
        perms.append(pi)
    return aligned, perms
