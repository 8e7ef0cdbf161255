"""Return-optimised merge coefficients by CMA-ES: evolutionary model merging driven by closed-loop return.

Akiba et al. (2024, "Evolutionary Optimization of Model Merging Recipes") search the coefficients of
a merge with CMA-ES (Hansen and Ostermeier, 2001) against a task score. Here the score is the
closed-loop return of the merged Decision Transformer: each generation's whole population is
merged by one vmapped call and scored by ONE batched `mdt_jax.evaluate.evaluate` call on the
selection episodes; the best candidate seen is then reported on fresh report episodes (reset seeds
disjoint from the selection seeds, DESIGN.md "Statistics and selection").

**Search spaces** (`make_space`): a pure, jittable `merge_fn(theta) -> params` over a vector theta
(D,) with one coordinate per coefficient group: one per transformer block (`groups="blocks"`, the
default), one per user-given subset (e.g. ``"attn;mlp"``), or one in all (``"one"``). CMA-ES
searches an unconstrained theta; a squashing maps each coordinate into its coefficient's range,
and theta = 0 is always the plain merge with the method's default coefficient (the baseline):

=================== ==================================== ============================================
method              coefficient per group                theta = 0 is
=================== ==================================== ============================================
lerp                p = sigmoid(x + logit(p0))  in (0,1) P3's lerp(pre, merged, p0), p0 = 0.5
task_arithmetic     lam = softplus(x + softplus^-1(lam0)) pre + lam0 sum_t tau_t, lam0 = 1/T (the
                    (> 0) on the finetunes' task vectors average of the T finetunes)
ties                lam as above, on the TIES-merged      TIES(k, lam0), lam0 = 1
                    task vector (trim to k, elect, mean)
dare                lam as above, on the DARE-dropped     P3's dare_ta: DARE(p) then task arithmetic
                    task vectors (p and the mask fixed)   with lam0 = 1/T
fisher              temperature T = softplus(x +          P2's Fisher merge (T = 1); T -> 0 is the
                    softplus^-1(1)) (> 0) on f_i^T        uniform average, large T the per-parameter
                                                          argmax of the Fishers
=================== ==================================== ============================================

Every group's merge is the `mdt_jax.merge` function restricted to that group's leaves (its
`subset`), so the search never re-implements a merge. TIES is linear in lam once its task vector
is trimmed and elected, so that vector is computed once and each group scales it through
`task_arithmetic` over the single merged vector; DARE's drop mask is drawn once (fixed `p`, key).
Fisher tempering: with f_i = F_i / trace_i (the reference's normalisation, trace over the merged
subset), the merge weighs model i by g_i = c (f_i / c)^T, c the mean of f over models and merged
scalars. The weights g_i / sum_j g_j are exactly f_i^T / sum_j f_j^T (c cancels), so T scales the
log-ratios log(f_1 / f_2) between models; c only keeps the merge's `floor` at its weight relative
to the typical Fisher. T = 1 gives g = f, the plain Fisher merge. Each task's own heads come from its own
finetune (as in P2/P3), leaves outside the subset from the base.

**The loop** (`cma_search`): evosax's `CMA_ES` ask/tell (it minimises, so it is told -fitness;
a NaN fitness counts as the worst). After every generation the CMA state, the RNG key and the
history (every candidate's theta and fitness) are written to ``workdir/cma_state.npz`` in one
atomic rename (`mdt_jax.fileio`), and ``workdir/history.json`` beside it, so that a killed search
rerun with the same arguments continues from its last finished generation and ends exactly where
an uninterrupted one does. `budget_episodes` caps the episodes spent.

`run_search` is the pipeline-level entry (P2/P3 inputs in, rows like `mdt_jax.evaluate.evaluate_model`'s
out); `search_run` takes a typed `SearchSpec` (configs/search.py's fields; `run.search_from_config` is the CLI's adapter).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import merge as M, pipelines as P, subsets
from mdt_jax import trees
from mdt_jax.fileio import NPZ, Store, write_json_atomic
from mdt_jax.models.dt import DTConfig

METHODS = ("lerp", "task_arithmetic", "ties", "dare", "fisher")
STATE_KEY = "cma_state"
STATE_FILE = STATE_KEY + NPZ.suffix
HISTORY_FILE = "history.json"


class SearchError(ValueError):
    """Bad search settings or inputs, or a workdir that holds a different search."""


# --------------------------------------------------------------------------------- coefficient groups

def _block_number(name: str) -> int:
    m = re.fullmatch(r"block_(\d+)", name)
    return int(m.group(1)) if m else -1


def coefficient_groups(params, subset: M.Subset = P.P2_SUBSET, groups: str | Sequence[str] = "blocks"
                       ) -> tuple[tuple[str, ...], list]:
    """(names, bool masks): one mask per coefficient group, each restricted to `subset`.

    `groups`: "blocks" (one group per ``block_{i}`` holding merged leaves, in block order), "one"
    (the whole subset), a ';'-separated string of groups, or a sequence of groups; a group is a
    comma-separated list of path patterns or aliases (`mdt_jax.subsets`). Groups must be disjoint
    and together cover every merged leaf (else SearchError naming the paths).
    """
    inside = M.subset_mask(params, subset)
    paths = trees.paths(params)
    sel = dict(zip(paths, jax.tree.leaves(inside)))
    if groups == "blocks":
        blocks = sorted({p.split("/")[0] for p, s in sel.items() if s and _block_number(p.split("/")[0]) >= 0},
                        key=_block_number)
        specs = [(b, (b,)) for b in blocks]
    elif groups in ("one", "all"):
        specs = [("all", None)]
    else:
        items = groups.split(";") if isinstance(groups, str) else list(groups)
        items = [g.strip() for g in items if str(g).strip()]
        specs = [(g, g) for g in items]
    if not specs:
        raise SearchError(f"groups={groups!r}: no coefficient group holds a merged parameter (subset={subset!r})")
    names, masks, owner = [], [], {}
    for name, pats in specs:
        if pats is None:
            mask = inside
        else:
            try:
                pmask = subsets.select(params, pats)
            except ValueError as e:
                raise SearchError(f"groups: {e}") from None
            mask = jax.tree.map(lambda a, b: bool(a) and bool(b), pmask, inside)
        members = [p for p, m in zip(paths, jax.tree.leaves(mask)) if m]
        if not members:
            raise SearchError(f"groups: group {name!r} holds no merged parameter (subset={subset!r})")
        clash = [p for p in members if p in owner]
        if clash:
            raise SearchError(f"groups: {name!r} and {owner[clash[0]]!r} overlap at {clash[:5]}")
        owner.update({p: name for p in members})
        names.append(name)
        masks.append(mask)
    missing = [p for p, s in sel.items() if s and p not in owner]
    if missing:
        raise SearchError(f"groups={groups!r} leave merged parameters without a coefficient: {missing[:8]}"
                          + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    return tuple(names), masks


def _per_group(masks, fn, coeffs, outside):
    """Leaf by leaf: from `fn(coeffs[g], masks[g])` where group g owns the leaf, else from `outside`."""
    out = outside
    for g, mask in enumerate(masks):
        merged = fn(coeffs[g], mask)
        out = trees.where(mask, merged, out)
    return out


# ----------------------------------------------------------------------------------- squashings

def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _softplus_inv(y: float) -> float:
    return math.log(math.expm1(y))


def _sigmoid_at(p0: float) -> Callable:
    shift = _logit(p0)
    return lambda x: jax.nn.sigmoid(jnp.asarray(x, jnp.float32) + shift)


def _softplus_at(y0: float) -> Callable:
    shift = _softplus_inv(y0)
    return lambda x: jax.nn.softplus(jnp.asarray(x, jnp.float32) + shift)


@dataclasses.dataclass(frozen=True)
class Space:
    """A coefficient parametrisation of one merge method.

    `merge_fn(theta (D,)) -> params` is pure and jittable (vmap it over a population);
    `squash(theta) -> (D,)` gives the coefficient values; `baseline()` is the plain merge with
    the neutral coefficient (what theta = 0 gives), computed by the `mdt_jax.merge` /
    `mdt_jax.pipelines` call directly.
    """

    method: str
    coefficient: str                 # "p", "lam" or "T"
    groups: tuple[str, ...]
    neutral: float                   # the coefficient at theta = 0
    fixed: dict                      # coefficients the search does not touch (k, dare p, floor)
    squash: Callable[[jax.Array], jax.Array]
    merge_fn: Callable[[jax.Array], dict]
    baseline: Callable[[], dict]

    @property
    def dim(self) -> int:
        return len(self.groups)

    def coefficients(self, theta) -> dict:
        """JSON-ready {coefficient: {group: value}} plus the fixed ones, for a concrete theta."""
        values = np.asarray(self.squash(jnp.asarray(theta, jnp.float32)), np.float64)
        return {self.coefficient: {g: float(v) for g, v in zip(self.groups, values)}} | self.fixed


def make_space(method: str, cfg: DTConfig, finetuned: Sequence[dict], *, pre: dict | None = None,
               merged: dict | None = None, fishers: Sequence[dict] | None = None, subset: str = P.P2_SUBSET,
               groups: str | Sequence[str] = "blocks", p0: float = 0.5, lam0: float | None = None,
               k: float = 0.2, dare_p: float = 0.3, dare_seed: int = 0, floor: float | None = None,
               normalize_trace: bool = True) -> Space:
    """The search space of `method` (see the module docstring) over P2/P3 inputs.

    `finetuned[t]` is the multi-task model finetuned on `cfg.tasks[t]`; `pre` the multi-task model
    before finetuning (lerp and the task-vector methods); `merged` the P2 merge lerp moves towards;
    `fishers` (one per finetune, trees like params) for fisher. `lam0` defaults to 1/T for
    task_arithmetic and dare, 1 for ties.
    """
    if method not in METHODS:
        raise SearchError(f"method: unknown {method!r}; choose from {METHODS}")
    if not cfg.multi:
        raise SearchError("the search merges per-task finetunes of a multi-task DT; cfg has no tasks")
    T = len(cfg.tasks)
    if len(finetuned) != T:
        raise SearchError(f"finetuned: need one finetune per task ({T}), got {len(finetuned)}")
    names = [f"finetune[{t}]" for t in cfg.task_names]
    stacked = M.stack(finetuned, names)
    heads: dict = {}
    for t, name in enumerate(cfg.task_names):
        heads |= P.heads_of(finetuned[t], name)
    gnames, masks = coefficient_groups(finetuned[0], subset, groups)
    full = M.subset_mask(finetuned[0], subset)
    if method in ("lerp", "task_arithmetic", "ties", "dare"):
        if pre is None:
            raise SearchError(f"method {method!r} needs pre (the multi-task model before finetuning)")
        M.check_compatible([pre, finetuned[0]], ["pre", names[0]])
        M.stack([pre], ["pre"])  # finiteness
    if method == "lerp":
        if merged is None:
            raise SearchError("method 'lerp' needs merged (the P2 merge it moves towards)")
        if not (isinstance(p0, (int, float)) and 0.0 < p0 < 1.0):
            raise SearchError(f"p0: must lie in (0, 1) (sigmoid's range), got {p0!r}")
        M.check_compatible([pre, merged], ["pre", "merged"])
        base = merged | {key: v for key, v in pre.items() if not key.startswith("task_")}
        squash = _sigmoid_at(float(p0))

        def merge_fn(theta):
            return _per_group(masks, lambda p, m: M.lerp(base, merged, p, subset=m), squash(theta), base)

        return Space(method, "p", gnames, float(p0), {}, squash, merge_fn,
                     lambda: M.lerp(base, merged, float(p0), subset=subset))
    if method == "fisher":
        if fishers is None or len(fishers) != T:
            raise SearchError(f"fishers: method 'fisher' needs one Fisher per finetune ({T}), "
                              f"got {0 if fishers is None else len(fishers)}")
        if floor is not None:
            M.check_coefficient("floor", floor, 0.0)
        fs = M.stack(fishers, [f"fisher[{t}]" for t in cfg.task_names])
        M.check_compatible([finetuned[0], M.first_model(fs)], [names[0], "fishers"])
        trees.check_nonnegative(fs, error=SearchError, where="fishers")
        f_norm, c = jax.jit(lambda f: _normalised_fishers(f, full, normalize_trace))(fs)
        squash = _softplus_at(1.0)

        def merge_one(temp, mask):
            tempered = jax.tree.map(lambda f: c * (f / c) ** temp, f_norm)
            return M.fisher_weighted(stacked, tempered, normalize_trace=False, floor=floor, subset=mask)

        def merge_fn(theta):
            return _per_group(masks, merge_one, squash(theta), M.first_model(stacked)) | heads

        return Space(method, "T", gnames, 1.0, {"floor": None if floor is None else float(floor), "normalize_trace": bool(normalize_trace)},
                     squash, merge_fn,
                     lambda: P.p2_merge(cfg, finetuned, "fisher", fishers, subset=subset, floor=floor,
                                        normalize_trace=normalize_trace))
    # the task-vector methods: lam >= 0 on a (trimmed / dropped) task vector
    lam0 = (1.0 if method == "ties" else 1.0 / T) if lam0 is None else lam0
    if not (isinstance(lam0, (int, float)) and 0.0 < lam0 < math.inf):
        raise SearchError(f"lam0: must be > 0 (softplus's range), got {lam0!r}")
    squash = _softplus_at(float(lam0))
    if method == "task_arithmetic":
        vectors, fixed = stacked, {}
        plain = lambda: M.task_arithmetic(pre, stacked, float(lam0), subset=subset) | heads
    elif method == "ties":
        M.check_coefficient("k", k, 0.0, 1.0, lo_open=True)
        ties_one = jax.jit(lambda b, m: M.ties(b, m, k, 1.0, subset=subset))(pre, stacked)
        vectors, fixed = jax.tree.map(lambda x: x[None], ties_one), {"k": float(k)}
        plain = lambda: M.ties(pre, stacked, k, float(lam0), subset=subset) | heads
    else:
        M.check_coefficient("dare_p", dare_p, 0.0, 1.0, hi_open=True)
        vectors = jax.jit(lambda b, m, key: M.dare(b, m, dare_p, key, subset=subset))(pre, stacked,
                                                                                     jax.random.key(dare_seed))
        fixed = {"p": float(dare_p), "dare_seed": int(dare_seed)}
        plain = lambda: M.task_arithmetic(pre, vectors, float(lam0), subset=subset) | heads

    def merge_fn(theta):
        return _per_group(masks, lambda lam, m: M.task_arithmetic(pre, vectors, lam, subset=m),
                          squash(theta), pre) | heads

    return Space(method, "lam", gnames, float(lam0), fixed, squash, merge_fn, plain)


def _normalised_fishers(fs, mask, normalize_trace: bool):
    """(f, c): f_i = F_i / trace_i (trace over `mask`, as `merge.fisher_weighted`) or F_i, and c the
    mean of f over the models and the scalars of `mask` (1 where that mean is 0)."""
    T = jax.tree.leaves(fs)[0].shape[0]
    sel = [f for f, m in zip(jax.tree.leaves(fs), jax.tree.leaves(mask)) if m]
    if normalize_trace:
        trace = sum(jnp.sum(f.reshape(T, -1), axis=1) for f in sel)
        scale = 1.0 / jnp.where(trace > 0, trace, 1.0)
    else:
        scale = jnp.ones((T,))
    f_norm = jax.tree.map(lambda f: f * scale.reshape((T,) + (1,) * (f.ndim - 1)), fs)
    n = sum(f.size for f in sel)
    c = sum(jnp.sum(f) for f, m in zip(jax.tree.leaves(f_norm), jax.tree.leaves(mask)) if m) / n
    return f_norm, jnp.where(c > 0, c, 1.0)


# ----------------------------------------------------------------------------------------- CMA-ES

@dataclasses.dataclass
class SearchResult:
    """The outcome of `cma_search`; fitness is higher-is-better, on the selection episodes."""

    best_theta: np.ndarray           # (D,)
    best_fitness: float
    best_generation: int
    best_index: int                  # its place in that generation's population
    coefficients: dict | None        # `coefficients_fn(best_theta)` when given
    history: list[dict]              # per generation: best, mean, theta (P, D), fitness (P,)
    generations_run: int
    episodes_used: int
    stopped: str                     # "generations" or "budget"
    final_mean: np.ndarray           # the CMA mean after the last generation
    final_sigma: float

    def to_json(self) -> dict:
        return {"best_theta": _jsonable(self.best_theta), "best_fitness": _jsonable(self.best_fitness),
                "best_generation": self.best_generation, "best_index": self.best_index,
                "coefficients": self.coefficients, "generations_run": self.generations_run,
                "episodes_used": self.episodes_used, "stopped": self.stopped,
                "final_mean": _jsonable(self.final_mean), "final_sigma": _jsonable(self.final_sigma),
                "history": self.history}


def _jsonable(x):
    """Floats (NaN/inf -> None) and nested lists from arrays, for strict JSON."""
    a = np.asarray(x, np.float64)
    if a.ndim == 0:
        v = float(a)
        return v if math.isfinite(v) else None
    return [_jsonable(v) for v in a]


def _int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise SearchError(f"{name}: must be an int >= {lo}, got {value!r}")
    return int(value)


def check_budget(budget_episodes, popsize: int, episodes_per_candidate: int) -> int:
    """Episodes one generation costs; a budget below that is refused (SearchError naming the fields)."""
    per_gen = popsize * episodes_per_candidate
    budget = _int("budget_episodes", budget_episodes, 1)
    if budget < per_gen:
        raise SearchError(f"budget_episodes={budget} is below one generation: popsize ({popsize}) x "
                          f"episodes_per_candidate ({episodes_per_candidate}) = {per_gen} episodes")
    return per_gen


def _history_row(g: int, thetas, fitness) -> dict:
    f = np.asarray(fitness, np.float64)
    ok = np.isfinite(f)
    return {"generation": g, "best": _jsonable(f[ok].max()) if ok.any() else None,
            "mean": _jsonable(f[ok].mean()) if ok.any() else None,
            "theta": _jsonable(thetas), "fitness": _jsonable(f)}


def _state_store(workdir: str) -> Store:
    return Store(workdir, NPZ, error=SearchError, what="search state")


def _save_state(store: Store, settings: dict, state, key, thetas, fitness) -> None:
    from flax import serialization

    arrays = {f"state/{k}": np.asarray(v) for k, v in serialization.to_state_dict(state).items()}
    arrays |= {"key": np.asarray(jax.random.key_data(key)), "thetas": np.asarray(thetas, np.float32),
               "fitness": np.asarray(fitness, np.float64), "settings": np.asarray(json.dumps(settings, sort_keys=True))}
    store.put(STATE_KEY, arrays, overwrite=True)


def _load_state(store: Store, settings: dict, template):
    from flax import serialization

    data = store.get(STATE_KEY)
    old = json.loads(str(data["settings"]))
    if old != json.loads(json.dumps(settings, sort_keys=True)):
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise SearchError(f"{store.path(STATE_KEY)} holds a search with different settings (differs in {diff}); "
                          "use a new workdir")
    fields = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("state/")}
    state = serialization.from_state_dict(template, {k: jnp.asarray(v) for k, v in fields.items()})
    return state, jax.random.wrap_key_data(jnp.asarray(data["key"])), data["thetas"], data["fitness"]


def cma_search(merge_fn: Callable[[jax.Array], Any], dim: int, evaluate_population: Callable[[Any], Any], *,
               popsize: int, generations: int, sigma0: float, seed: int, workdir: str, budget_episodes: int,
               episodes_per_candidate: int, progress: bool = True, x0=None,
               coefficients_fn: Callable[[np.ndarray], dict] | None = None, settings: dict | None = None
               ) -> SearchResult:
    """Maximise `evaluate_population(jax.vmap(merge_fn)(thetas)) -> (popsize,)` over theta (dim,) by CMA-ES.

    Starts at `x0` (default 0: the neutral, plain merge) with step size `sigma0`. Each generation
    asks evosax's CMA_ES for `popsize` thetas, builds the candidates in one jitted vmapped
    `merge_fn`, scores them with ONE `evaluate_population` call, tells -fitness (CMA_ES minimises),
    and saves state, key and history atomically to `workdir` (see the module docstring); a rerun
    with the same settings resumes there. `episodes_per_candidate` is what one candidate costs
    (episodes per task x tasks x seeds); the search stops after `generations`, or earlier when the
    next generation would take more than `budget_episodes` in all. `settings` (JSON) is stored
    with the state, and a workdir whose state was made with other settings is refused.
    """
    from evosax.algorithms import CMA_ES
    from tqdm import tqdm

    dim = _int("dim", dim, 1)
    popsize = _int("popsize", popsize, 2)
    generations = _int("generations", generations, 1)
    seed = _int("seed", seed, 0)
    epc = _int("episodes_per_candidate", episodes_per_candidate, 1)
    if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or not (0 < sigma0 < math.inf):
        raise SearchError(f"sigma0: must be a finite number > 0, got {sigma0!r}")
    per_gen = check_budget(budget_episodes, popsize, epc)
    x0 = np.zeros(dim, np.float32) if x0 is None else np.asarray(x0, np.float32)
    if x0.shape != (dim,) or not np.all(np.isfinite(x0)):
        raise SearchError(f"x0: must be a finite vector of shape ({dim},), got shape {x0.shape}")
    n_gen = min(generations, budget_episodes // per_gen)
    settings = {"dim": dim, "popsize": popsize, "sigma0": float(sigma0), "seed": seed, "x0": x0.tolist(),
                "episodes_per_candidate": epc} | ({"extra": settings} if settings else {})

    es = CMA_ES(population_size=popsize, solution=jnp.zeros(dim, jnp.float32))
    params = es.default_params.replace(std_init=jnp.asarray(sigma0, jnp.float32))
    key = jax.random.key(seed)
    key, k_init = jax.random.split(key)
    state = es.init(k_init, jnp.asarray(x0), params)
    store = _state_store(workdir)
    thetas = np.zeros((0, popsize, dim), np.float32)
    fitness = np.zeros((0, popsize), np.float64)
    if STATE_KEY in store:
        state, key, thetas, fitness = _load_state(store, settings, state)
    build = jax.jit(jax.vmap(merge_fn))
    history = [_history_row(g, t, f) for g, (t, f) in enumerate(zip(thetas, fitness))]
    if history:  # a run killed between the state and the history write left the history one behind
        write_json_atomic(os.path.join(workdir, HISTORY_FILE), {"settings": settings, "history": history})
    bar = tqdm(total=n_gen, initial=min(len(history), n_gen), desc="cma-es", unit="gen", disable=not progress,
               dynamic_ncols=True)
    for g in range(len(history), n_gen):
        t0 = time.perf_counter()
        key, k_ask, k_tell = jax.random.split(key, 3)
        pop, state = es.ask(k_ask, state, params)
        fit = np.asarray(evaluate_population(build(pop)), np.float64)
        if fit.shape != (popsize,):
            raise SearchError(f"evaluate_population returned shape {fit.shape}, expected ({popsize},)")
        state, _ = es.tell(k_tell, pop, jnp.asarray(-fit, jnp.float32), state, params)
        thetas = np.concatenate([thetas, np.asarray(pop, np.float32)[None]])
        fitness = np.concatenate([fitness, fit[None]])
        history.append(_history_row(g, thetas[-1], fit))
        _save_state(store, settings, state, key, thetas, fitness)
        write_json_atomic(os.path.join(workdir, HISTORY_FILE), {"settings": settings, "history": history})
        bar.set_postfix(best=history[-1]["best"], mean=history[-1]["mean"],
                        cand_per_s=f"{popsize / (time.perf_counter() - t0):.2f}")
        bar.update(1)
    bar.close()
    if not len(fitness):
        raise SearchError("no generation ran (generations or budget_episodes too small)")
    flat = np.where(np.isfinite(fitness), fitness, -np.inf).reshape(-1)
    best = int(np.argmax(flat))  # the first of equal bests
    bg, bi = divmod(best, popsize)
    best_theta = thetas[bg, bi].astype(np.float64)
    return SearchResult(best_theta=best_theta, best_fitness=float(fitness[bg, bi]), best_generation=bg,
                        best_index=bi, coefficients=coefficients_fn(best_theta) if coefficients_fn else None,
                        history=history, generations_run=len(fitness), episodes_used=len(fitness) * per_gen,
                        stopped="generations" if len(fitness) >= generations else "budget",
                        final_mean=np.asarray(state.mean, np.float64), final_sigma=float(state.std))


# ------------------------------------------------------------------------------------ pipeline level

def _seeds(name: str, value) -> tuple[int, ...]:
    vals = (value,) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else tuple(value)
    if not vals or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in vals):
        raise SearchError(f"{name}: must be an int >= 0 or a non-empty list of them, got {value!r}")
    if len(set(vals)) != len(vals):
        raise SearchError(f"{name}: repeats a seed: {list(vals)}")
    return tuple(int(v) for v in vals)


def check_seeds(selection_seed, report_seed) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Both seed lists; equal or overlapping ones are refused (the choice must be reported on fresh episodes)."""
    sel, rep = _seeds("selection_seed", selection_seed), _seeds("report_seed", report_seed)
    common = sorted(set(sel) & set(rep))
    if common:
        raise SearchError(f"selection_seed {list(sel)} and report_seed {list(rep)} share {common}: the "
                          "best candidate must be reported on episodes it was not chosen on")
    return sel, rep


def _seed_json(seeds: tuple[int, ...]):
    return seeds[0] if len(seeds) == 1 else list(seeds)


def evaluate_seeds(cfg, params, tasks, stats, seeds, **kw):
    """`mdt_jax.evaluate.evaluate` once per reset seed, the episodes concatenated: TaskResults (M, E x seeds)."""
    from mdt_jax import evaluate as ev

    runs = [ev.evaluate(cfg, params, tasks, stats, seed=s, **kw) for s in seeds]
    if len(runs) == 1:
        return runs[0]
    cat = lambda rs, f: np.concatenate([getattr(r, f) for r in rs], axis=1)
    return [ev.TaskResult(rs[0].task, cat(rs, "returns"), cat(rs, "lengths"), cat(rs, "nan_actions"),
                          rs[0].target_return) for rs in zip(*runs)]


def population_fitness(results) -> np.ndarray:
    """(M,) fitness: the mean over tasks of the D4RL-normalised score of each candidate's mean return."""
    from mdt_jax import envs

    return np.mean([envs.normalized_score(r.task, r.returns.mean(axis=1)) for r in results], axis=0)


def run_search(cfg: DTConfig, finetuned: Sequence[dict], stats: dict, *, method: str, workdir: str,
               pre: dict | None = None, merged: dict | None = None, fishers: Sequence[dict] | None = None,
               subset: str = P.P2_SUBSET, groups: str | Sequence[str] = "blocks", popsize: int = 8,
               generations: int = 10, sigma0: float = 0.5, seed: int = 0, selection_seed=1, report_seed=2,
               episodes: int = 4, report_episodes: int | None = None, max_steps: int = 1000,
               executor: str = "auto", budget_episodes: int | None = None, progress: bool = True, mesh=None,
               **space_kw) -> "SearchRun":
    """Search `method`'s per-group coefficients on selection episodes, report on fresh ones.

    Inputs are P2/P3's (`cfg` multi-task; `finetuned` in `cfg.tasks` order; `pre`, `merged`,
    `fishers` as `make_space` needs; `stats` {task: TaskStats}). Every candidate of a generation
    runs `episodes` episodes per task and selection seed, all in one batched evaluation; the best
    (highest mean normalised score seen) and the baseline (theta = 0: the plain merge with the
    uniform neutral coefficient) are then evaluated together on `report_episodes` (default
    `episodes`) per report seed. Returns (rows, result, space): one row per (model, task) like
    `mdt_jax.evaluate.evaluate_model`'s, with `selection` {"chosen_on", "reported_on"}.
    `budget_episodes` defaults to exactly `generations` generations. `space_kw` go to `make_space`.
    Returns a `SearchRun` (rows, result, space, best params).
    """
    sel, rep = check_seeds(selection_seed, report_seed)
    if not cfg.multi:
        raise SearchError("the search merges per-task finetunes of a multi-task DT; cfg has no tasks")
    tasks = list(cfg.task_names)
    episodes = _int("episodes", episodes, 1)
    report_episodes = episodes if report_episodes is None else _int("report_episodes", report_episodes, 1)
    epc = episodes * len(sel) * len(tasks)
    popsize = _int("popsize", popsize, 2)
    generations = _int("generations", generations, 1)
    budget = generations * popsize * epc if budget_episodes is None else budget_episodes
    check_budget(budget, popsize, epc)
    missing = [t for t in tasks if t not in stats]
    if missing:
        raise SearchError(f"stats: no normalisation stats for tasks {missing}")
    space = make_space(method, cfg, finetuned, pre=pre, merged=merged, fishers=fishers, subset=subset,
                       groups=groups, **space_kw)
    kw = dict(episodes=episodes, max_steps=max_steps, executor=executor, mesh=mesh)
    fitness_fn = lambda stacked: population_fitness(evaluate_seeds(cfg, stacked, tasks, stats, sel, **kw))
    settings = {"method": method, "groups": list(space.groups), "subset": subset, "fixed": space.fixed,
                "neutral": space.neutral, "selection_seed": list(sel), "tasks": tasks, "max_steps": max_steps}
    result = cma_search(space.merge_fn, space.dim, fitness_fn, popsize=popsize, generations=generations,
                        sigma0=sigma0, seed=seed, workdir=workdir, budget_episodes=budget,
                        episodes_per_candidate=epc, progress=progress, coefficients_fn=space.coefficients,
                        settings=settings)
    best = jax.jit(space.merge_fn)(jnp.asarray(result.best_theta, jnp.float32))
    both = M.stack([best, jax.jit(space.baseline)()], ["best", "baseline"])
    results = evaluate_seeds(cfg, both, tasks, stats, rep, **(kw | {"episodes": report_episodes}))
    selection = {"chosen_on": _seed_json(sel), "reported_on": _seed_json(rep)}
    models = [(f"search_{method}", result.coefficients, result.best_fitness),
              (f"{method}_neutral", space.coefficients(np.zeros(space.dim)), None)]
    rows = []
    for i, (name, coeffs, fit) in enumerate(models):
        for r in results:
            rows.append(r.summary(i) | {"model": name, "coefficients": coeffs, "selection": selection}
                        | ({"selection_fitness": _jsonable(fit)} if fit is not None else {}))
    return SearchRun(rows, result, space, best)


class SearchRun(NamedTuple):
    rows: list[dict]        # best and baseline on the report episodes, one row per (model, task)
    result: SearchResult
    space: Space
    best: dict              # the best candidate's params


# ----------------------------------------------------------------------------------------------- CLI

@dataclasses.dataclass(frozen=True)
class SearchEval:
    episodes: int = 4           # per candidate, task and selection seed
    report_episodes: int = 10   # per task and report seed, for the best and the baseline
    max_steps: int = 1000
    executor: str = "auto"


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """One search (configs/search.py's fields, typed; see that file for each one's meaning)."""

    checkpoints: tuple[str, ...] = ()
    base: str = ""
    fishers: tuple[str, ...] = ()
    method: str = "task_arithmetic"
    merge: str = "average"
    subset: str = ""
    groups: str = "blocks"
    p0: float = 0.5
    lam0: float = 0.0
    k: float = 0.2
    dare_p: float = 0.3
    floor: float | None = None
    normalize_trace: bool = True
    popsize: int = 8
    generations: int = 10
    sigma: float = 0.5
    seed: int = 0
    selection_seed: str = "1"
    report_seed: str = "2"
    budget_episodes: int = 0
    eval: SearchEval = SearchEval()

    def __post_init__(self):
        for f in ("checkpoints", "fishers"):
            if isinstance(getattr(self, f), str):
                raise TypeError(f"SearchSpec.{f}: a tuple of folders, not a string")
            object.__setattr__(self, f, tuple(getattr(self, f)))
        if isinstance(self.eval, dict):
            object.__setattr__(self, "eval", SearchEval(**self.eval))

    def run_config(self) -> dict:
        """This search in configs/search.py's layout, as the workdir records it."""
        return dataclasses.asdict(self) | {"checkpoints": ",".join(self.checkpoints), "fishers": ",".join(self.fishers)}


def search_run(config: SearchSpec, workdir: str) -> str:
    """Run configs/search.py: load the finetunes (and base, Fishers), search, report; write search.json."""
    from mdt_jax import checkpoint, envs, evaluate as ev
    from mdt_jax.fisher_stage import load_fishers
    from mdt_jax.results import results_table
    from mdt_jax.fileio import run_config_guard

    if config.method not in METHODS:
        raise ValueError(f"config.method: unknown {config.method!r}; choose from {METHODS}")
    out_json = os.path.join(workdir, "search.json")
    if os.path.exists(out_json):
        raise FileExistsError(f"{workdir} already holds a finished search (search.json); use a new --workdir")
    seeds = _int_list("config.selection_seed", config.selection_seed), _int_list("config.report_seed",
                                                                                  config.report_seed)
    try:
        sel, rep = check_seeds(*seeds)
    except SearchError as e:
        raise SearchError(f"config.{e}") from None
    for name in ("popsize", "generations"):
        _int(f"config.{name}", getattr(config, name), 2 if name == "popsize" else 1)
    for name in ("episodes", "report_episodes", "max_steps"):
        _int(f"config.eval.{name}", getattr(config.eval, name), 1)
    if not (isinstance(config.sigma, (int, float)) and 0 < config.sigma < math.inf):
        raise SearchError(f"config.sigma: must be a finite number > 0, got {config.sigma!r}")
    paths = list(config.checkpoints)
    if len(paths) < 2:
        raise ValueError(f"config.checkpoints: need at least 2 finetunes to merge, got {len(paths)}")
    metas = [checkpoint.read_meta(p) for p in paths]
    cfgs = {c for c, _ in metas}
    if len(cfgs) != 1 or not next(iter(cfgs)).multi:
        raise ValueError("config.checkpoints: the search merges per-task finetunes of one multi-task DT "
                         "(all with the same multi-task config)")
    cfg = cfgs.pop()
    by_task = {m.get("task"): i for i, (_, m) in enumerate(metas)}
    if set(by_task) != set(cfg.task_names) or len(by_task) != len(paths):
        raise ValueError(f"config.checkpoints: need one finetune per task {cfg.task_names}, "
                         f"got {sorted(map(str, by_task))}")
    epc = config.eval.episodes * len(sel) * len(cfg.task_names)
    budget = config.budget_episodes or config.generations * config.popsize * epc
    try:
        check_budget(budget, config.popsize, epc)
    except SearchError as e:
        raise SearchError(f"config.{e} (eval.episodes x seeds x tasks)") from None
    needs_base = config.method != "fisher"
    if needs_base and not config.base:
        raise ValueError(f"config.base: method {config.method!r} needs the multi-task model before finetuning")
    fpaths = list(config.fishers)
    if (config.method == "fisher" or config.merge == "fisher") and len(fpaths) != len(paths):
        raise ValueError(f"config.fishers: need one Fisher per checkpoint ({len(paths)}), got {len(fpaths)}")
    if config.merge not in ("average", "fisher"):
        raise ValueError(f"config.merge: unknown {config.merge!r}; choose average or fisher")

    order = [paths[by_task[t]] for t in cfg.task_names]
    loaded = [checkpoint.load(p) for p in order]
    finetuned = [m.params for m in loaded]
    first = loaded[0]  # every finetune of the model carries its normalisers
    stats = ev.model_stats(first, cfg.task_names, field="config.checkpoints")
    fishers = None
    if fpaths:
        fishers = load_fishers([fpaths[by_task[t]] for t in cfg.task_names])
    pre = None
    if config.base:
        base = checkpoint.load(config.base)
        base_cfg, pre = base.cfg, base.params
        if base_cfg != cfg:
            raise ValueError(f"config.base: {config.base} is not the model these finetunes came from (config differs)")
    subset = config.subset or P.P2_SUBSET
    merged = P.p2_merge(cfg, finetuned, config.merge, fishers, subset=subset) if config.method == "lerp" else None
    space_kw = dict(p0=config.p0, lam0=config.lam0 or None, k=config.k, dare_p=config.dare_p,
                    dare_seed=config.seed, floor=config.floor, normalize_trace=config.normalize_trace)
    run_config_guard(workdir, config.run_config())  # a killed run resumes; a different one is refused
    rows, result, space, best = run_search(
        cfg, finetuned, stats, method=config.method, workdir=workdir, pre=pre, merged=merged, fishers=fishers,
        subset=subset, groups=config.groups, popsize=config.popsize, generations=config.generations,
        sigma0=config.sigma, seed=config.seed, selection_seed=sel, report_seed=rep, episodes=config.eval.episodes,
        report_episodes=config.eval.report_episodes, max_steps=config.eval.max_steps,
        executor=config.eval.executor, budget_episodes=budget, **space_kw)
    record = {"method": config.method, "coefficient": space.coefficient, "groups": list(space.groups),
              "subset": subset, "neutral": space.neutral, "fixed": space.fixed, "models": order,
              "base": config.base, "fishers": fpaths, "merge": config.merge if config.method == "lerp" else None,
              "popsize": config.popsize, "generations": config.generations, "sigma0": config.sigma,
              "seed": config.seed, "budget_episodes": budget, "episodes_per_candidate": epc,
              "selection": {"chosen_on": _seed_json(sel), "reported_on": _seed_json(rep)},
              "best_checkpoint": "best"}
    meta_out = {k: first.metadata[k] for k in ("tasks",) if k in first.metadata} | {
        "kind": "multi_task_merged", "merge": {"method": f"search_{config.method}", "subset": subset,
                                               "coefficients": result.coefficients}}
    checkpoint.save_once(os.path.join(workdir, "best"), jax.device_get(best), first, meta_out)
    write_json_atomic(out_json, {"search": record, "result": result.to_json(), "rows": rows}, overwrite=False)
    return results_table(rows, keys=("model", "task", "episodes", "return_mean", "return_std", "normalized"))


def _int_list(name: str, value) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),)
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise SearchError(f"{name}: expected comma-separated ints, got {value!r}") from None
