"""EMR-Merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS
2024): one unified task vector, and per task a bool mask and a scalar rescaler.

Given a base theta_0 (the weights before finetuning) and N finetunes theta_i with task vectors
tau_i = theta_i - theta_0 on the merged subset (default the trunk blocks):

- **Elect**: gamma = +1 where sum_i tau_i > 0, else -1; mag = max_i |tau_i| over the i with
  tau_i * gamma > 0 (0 where none agree); tau_uni = gamma * mag.
- **Mask**: M_i = (tau_i * gamma > 0), the entries where task i agrees with the elected sign
  (the same set as tau_i * tau_uni > 0).
- **Rescale**: lambda_i = sum_n mean|tau_i,n| / sum_n mean|M_i,n * tau_uni,n|, the sums over the
  subset's tensors n, so that task i's modulated vector has the mean magnitude of its own.
- Task i's model: theta_0 + lambda_i * M_i * tau_uni on the subset, task i's own leaves elsewhere.

What the original code (github.com/harveyhuang18/EMR_Merging; `emr_merge` in
merge_vit/src/main_emr_merging.py, `EMR_merge` in merge_beit3/merge_beit.py, `emr_merging` in
merge_lm/model_merging_methods/merging_methods.py, all the same) does, and this module follows:
- the sign is ``flag = (mean_i tau_i > 0) * 2 - 1``: a tie (sum exactly 0) elects **-1**, not 0,
  so there the models with a negative entry agree and keep it (an entry zero in every model gets
  gamma = -1 with an empty mask and tau_uni = 0);
- lambda is **one scalar per model** (shape (N,)), not per tensor, but its numerator and
  denominator are sums over tensors of *per-tensor means* (``scales[m] += mean(|param|)``), not
  one global sum over entries: every tensor weighs 1 / its size;
- the mask is ``(tau_i * flag) > 0`` and the magnitude ``max_i |mask_i * tau_i|``.
One guard is added: where a model's mask is empty (its task vector is zero, or disagrees with
gamma everywhere), the original's lambda is x / 0 (inf or NaN); here it is 0, which changes
nothing since M_i * tau_uni = 0 there.

The P2 setting (`mdt_jax.pipelines`): per-task finetunes of one multi-task DT, `base` the
multi-task model they started from. Outside the subset, each task keeps its own leaves (its
heads, `rest`), except the leaves frozen while finetuning (`frozen`, by default P2's ln_f and
timestep embedding), which must equal the base's (else the finetunes did not come from this base)
and are taken from it. `evaluate_task_models` evaluates task t with task model t only.

Artifacts (`save_emr` / `load_emr`), written atomically and never overwritten::

    DIR/emr.json   {"format": "mdt_jax.emr", "format_version": 1, "base": path, "config": DTConfig,
                    "names", "subset", "frozen", "rescalers", "metadata": {...}}
    DIR/arrays/    orbax pytree {"tau_uni", "masks", "rescalers", "rest"}

`load_task_models(DIR)` rebuilds the N task models from it and the base checkpoint it names.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import merge as M, subsets
from mdt_jax import trees
from mdt_jax.fileio import orbax_read, orbax_writer, read_header, write_dir_atomic, write_json_atomic
from mdt_jax.pipelines import P2_FINETUNE, P2_SUBSET

FORMAT = "mdt_jax.emr"
FORMAT_VERSION = 1
META_FILE = "emr.json"
ARRAYS = "arrays"
FROZEN = tuple(P2_FINETUNE["freeze"])


class EMRError(M.MergeError):
    """An EMR artifact that is missing, corrupt or inconsistent, or a bad task index."""


@flax.struct.dataclass
class EMR:
    """EMR-merged models. `tau_uni` holds the subset's leaves of the params tree (nested dicts,
    other keys absent); `masks` the same leaves as bools with a leading model axis N; `rest` each
    model's own leaves outside the subset and outside the frozen ones, leading axis N."""

    tau_uni: Any
    masks: Any
    rescalers: jax.Array   # (N,) float32
    rest: Any

    @property
    def num_models(self) -> int:
        return int(np.shape(self.rescalers)[0])


# ----------------------------------------------------------------------- nested-dict selections

def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


# ------------------------------------------------------------------------------------ merging

def emr_elect(base, models, *, subset=P2_SUBSET, frozen: Sequence[str] = FROZEN,
              names: Sequence[str] | None = None) -> EMR:
    """Elect the unified task vector, masks and rescalers of `models` (stacked, `merge.stack`)
    against `base` on `subset` (patterns / aliases, or a bool tree over `base`).

    Refused with MergeError naming the path: a base whose shapes differ from the models'; a model
    whose leaf outside `subset` matching `frozen` differs from the base's (it cannot have been
    finetuned from it); task vectors identically zero on `subset` for every model; non-finite
    values. The value checks run when the inputs are concrete (outside jit).
    """
    N = M.num_models(models)
    names = list(names or [f"finetune {i}" for i in range(N)])
    if len(names) != N:
        raise M.MergeError(f"{len(names)} names for {N} models")
    M.check_compatible([base, M.first_model(models)], ["base", "finetunes"])
    sel = M.subset_mask(base, subset)
    if not any(bool(s) for s in jax.tree.leaves(sel)):
        raise M.MergeError(f"subset {subset!r} selects no parameter")
    fro = subsets.select(base, frozen) if frozen else jax.tree.map(lambda _: False, base)
    outside_frozen = jax.tree.map(lambda s, f: (not s) and bool(f), sel, fro)
    own = jax.tree.map(lambda s, f: (not s) and not bool(f), sel, fro)
    if _concrete(base, models):
        trees.check_finite(base, error=M.MergeError, what="base")
        for (p, b), x, f in zip(trees.flatten(base).items(), jax.tree.leaves(models), jax.tree.leaves(outside_frozen)):
            if not f:
                continue
            b, x = np.asarray(b), np.asarray(x)
            for i in range(N):
                if not np.array_equal(x[i], b):
                    raise M.MergeError(
                        f"{names[i]} differs from the base at {p}, a leaf frozen while "
                        f"finetuning ({', '.join(frozen)}): it cannot have been finetuned from this base")
        trees.check_finite(models, error=M.MergeError, names=names)
    bsub, msub = trees.pick(base, sel, error=M.MergeError), trees.pick(models, sel, error=M.MergeError)
    if _concrete(bsub, msub) and all(np.array_equal(np.asarray(x), np.broadcast_to(np.asarray(b), np.shape(x)))
                                     for b, x in zip(jax.tree.leaves(bsub), jax.tree.leaves(msub))):
        raise M.MergeError(f"the task vectors on subset {subset!r} are identically zero for every model "
                           f"(paths {trees.paths(bsub)[:3]}...): the finetunes equal the base (wrong base?)")
    tau_uni, masks, rescalers = _elect(bsub, msub)
    return EMR(tau_uni=tau_uni, masks=masks, rescalers=rescalers, rest=trees.pick(models, own, error=M.MergeError))


@jax.jit
def _elect(bsub, msub):
    """(tau_uni, masks, rescalers) from the subset's base leaves and stacked model leaves."""
    tv = jax.tree.map(lambda b, x: x - b[None], bsub, msub)
    N = jax.tree.leaves(tv)[0].shape[0]

    def elect(t):  # the original's flag = (mean > 0) * 2 - 1: a tie elects -1
        gamma = jnp.where(jnp.sum(t, axis=0) > 0, 1.0, -1.0).astype(t.dtype)
        mask = t * gamma[None] > 0
        mag = jnp.max(jnp.where(mask, jnp.abs(t), 0), axis=0)
        return gamma * mag, mask

    elected = jax.tree.map(elect, tv)
    is_pair = lambda x: isinstance(x, tuple)
    tau_uni = jax.tree.map(lambda e: e[0], elected, is_leaf=is_pair)
    masks = jax.tree.map(lambda e: e[1], elected, is_leaf=is_pair)
    per_tensor_mean = lambda x: jnp.mean(jnp.abs(x).reshape(N, -1).astype(jnp.float32), axis=1)  # (N,)
    num = sum(per_tensor_mean(t) for t in jax.tree.leaves(tv))
    den = sum(per_tensor_mean(jnp.where(m, u[None], 0)) for m, u in zip(jax.tree.leaves(masks),
                                                                        jax.tree.leaves(tau_uni)))
    rescalers = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
    return tau_uni, masks, rescalers


def _check_emr(base, emr: EMR) -> None:
    got, want = trees.shapes(emr.tau_uni), trees.shapes(base)
    N = emr.num_models
    problems = [f"{p}: not in the base" for p in sorted(set(got) - set(want))]
    problems += [f"{p}: base has {want[p]}, tau_uni has {s}" for p, s in got.items() if p in want and want[p] != s]
    for field in ("masks", "rest"):
        tree = getattr(emr, field)
        for p, x in trees.flatten(tree).items():
            if p not in want:
                problems.append(f"{field}/{p}: not in the base")
            elif tuple(np.shape(x)) != (N,) + want[p]:
                problems.append(f"{field}/{p}: shape {tuple(np.shape(x))}, expected {(N,) + want[p]}")
    if problems:
        raise EMRError("the EMR does not fit the base: " + "; ".join(problems[:20]))


def emr_task_params(base, emr: EMR, i) -> dict:
    """Task i's model: base + lambda_i * M_i * tau_uni on the subset, model i's own `rest`, the
    base's frozen leaves. `i` may be traced (then it is not range-checked)."""
    _check_emr(base, emr)
    if _concrete(i):
        if np.ndim(i) != 0 or not np.issubdtype(np.asarray(i).dtype, np.integer) or \
                not 0 <= int(i) < emr.num_models:
            raise EMRError(f"task index must be an int in [0, {emr.num_models}), got {i!r}")
    return _task_params(base, emr, i)


def _subtree(tree, like):
    """The leaves of `tree` at the paths of the nested dict `like`."""
    if not isinstance(like, dict):
        return tree
    return {k: _subtree(tree[k], v) for k, v in like.items()}


@jax.jit
def _task_params(base, emr: EMR, i):
    lam = emr.rescalers[i]
    sub = jax.tree.map(lambda b, u, m: (b + lam * jnp.where(m[i], u, 0)).astype(b.dtype),
                       _subtree(base, emr.tau_uni), emr.tau_uni, emr.masks)
    return trees.overlay(trees.overlay(base, sub), jax.tree.map(lambda x: x[i], emr.rest))


def emr_stack(base, emr: EMR) -> dict:
    """All N task models stacked on a leading axis (candidate t = task t's model), jittable."""
    _check_emr(base, emr)
    return _stack(base, emr)


@jax.jit
def _stack(base, emr: EMR):
    N = emr.rescalers.shape[0]
    lam = emr.rescalers
    sub = jax.tree.map(lambda b, u, m: (b[None] + lam.reshape((N,) + (1,) * b.ndim) * jnp.where(m, u[None], 0))
                       .astype(b.dtype), _subtree(base, emr.tau_uni), emr.tau_uni, emr.masks)
    full = jax.tree.map(lambda b: jnp.broadcast_to(b, (N,) + jnp.shape(b)), base)
    return trees.overlay(trees.overlay(full, sub), emr.rest)


# --------------------------------------------------------------------------------- evaluation

def evaluate_task_models(cfg, task_params, stats: dict, *, episodes: int = 50, max_steps: int = 1000,
                         seed: int = 0, executor: str = "auto", extra: dict | None = None) -> list[dict]:
    """Evaluate a multi-task DT whose task t runs with its own params: `task_params` stacked on a
    leading axis aligned with `cfg.task_names`; task t is evaluated (`mdt_jax.evaluate.evaluate`)
    with candidate t only. Returns one summary row per task (as `evaluate.evaluate_model`'s rows), plus `extra`."""
    from mdt_jax import evaluate as ev

    if not cfg.multi:
        raise ValueError("evaluate_task_models: a multi-task config is needed (one task model per task)")
    n = {np.shape(x)[0] if np.ndim(x) else -1 for x in jax.tree.leaves(task_params)}
    if n != {len(cfg.task_names)}:
        raise ValueError(f"evaluate_task_models: need {len(cfg.task_names)} task models stacked on a leading "
                         f"axis (tasks {cfg.task_names}), got leading sizes {sorted(n)}")
    rows = []
    for t, name in enumerate(cfg.task_names):
        params = jax.tree.map(lambda x: x[t], task_params)
        (r,) = ev.evaluate(cfg, params, [name], stats, episodes=episodes, max_steps=max_steps, seed=seed,
                           executor=executor)
        rows.append(r.summary(0) | (extra or {}) | {"task_model": name})
    return rows


# ---------------------------------------------------------------------------------- artifacts

def save_emr(directory, emr: EMR, *, base: str, config, names: Sequence[str], subset, frozen=FROZEN,
             metadata: dict | None = None) -> str:
    """Atomically write `emr` (one merge, concrete arrays) with the path of its base checkpoint and
    the model config to `directory`; an existing non-empty folder is refused."""
    directory = os.path.abspath(os.fspath(directory))
    lam = np.asarray(emr.rescalers, np.float64)
    if lam.shape != (len(names),):
        raise EMRError(f"save_emr: {len(names)} names for rescalers of shape {lam.shape}")
    if not np.all(np.isfinite(lam)) or np.any(lam < 0):
        raise EMRError(f"save_emr: rescalers must be finite and >= 0, got {lam.tolist()}")
    for field in ("tau_uni", "rest"):
        trees.check_finite(getattr(emr, field), error=EMRError, where="save_emr", what=field)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "base": os.path.abspath(os.fspath(base)),
            "config": config.to_dict(), "names": list(names),
            "subset": subset if isinstance(subset, str) else list(subset), "frozen": list(frozen),
            "rescalers": lam.tolist(), "metadata": metadata or {}}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise EMRError(f"save_emr: metadata is not JSON-serialisable: {e}") from None
    arrays = {"tau_uni": emr.tau_uni, "masks": emr.masks, "rescalers": emr.rescalers, "rest": emr.rest}
    return write_dir_atomic(directory, {ARRAYS: orbax_writer(arrays), META_FILE: lambda p: write_json_atomic(p, meta)})


def load_emr(directory) -> tuple[EMR, dict]:
    """(EMR, header) from a `save_emr` folder; anything incomplete or inconsistent raises EMRError."""
    directory = os.path.abspath(os.fspath(directory))
    meta = read_header(directory, META_FILE, FORMAT, FORMAT_VERSION, EMRError, "EMR artifact")
    lam = meta.get("rescalers")
    if not isinstance(lam, list) or not lam or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0
                                                       for v in lam):
        raise EMRError(f"{os.path.join(directory, META_FILE)}: rescalers must be a list of finite numbers >= 0")
    a = orbax_read(os.path.join(directory, ARRAYS), EMRError, "EMR artifact")
    missing = {"tau_uni", "masks", "rescalers"} - set(a)
    if missing:
        raise EMRError(f"{directory}/{ARRAYS}: missing {sorted(missing)}")
    emr = EMR(tau_uni=a["tau_uni"], masks=a["masks"], rescalers=np.asarray(a["rescalers"], np.float32),
              rest=a.get("rest") or {})
    if emr.rescalers.shape != (len(lam),) or not np.allclose(emr.rescalers, lam, rtol=1e-6):
        raise EMRError(f"{directory}: the stored rescalers disagree with {META_FILE}")
    if trees.paths(emr.tau_uni) != trees.paths(emr.masks):
        raise EMRError(f"{directory}: masks and tau_uni cover different parameters")
    for p, m in trees.flatten(emr.masks).items():
        if np.asarray(m).dtype != np.bool_ or np.shape(m)[:1] != (len(lam),):
            raise EMRError(f"{directory}: masks/{p} must be bool with leading axis {len(lam)}")
    return emr, meta


def load_task_models(directory):
    """(config, the N task models stacked, header) from an EMR artifact and the base it names."""
    from mdt_jax import checkpoint
    from mdt_jax.models.dt import DTConfig

    emr, meta = load_emr(directory)
    cfg = DTConfig.from_dict(meta["config"])
    base_model = checkpoint.load(meta["base"])
    base_cfg, base = base_model.cfg, base_model.params
    if base_cfg != cfg:
        raise EMRError(f"{directory}: its base {meta['base']} has a different model config")
    return cfg, emr_stack(base, emr), meta
