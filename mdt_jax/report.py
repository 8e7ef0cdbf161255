"""Statistics of the study with rliable (Agarwal et al. 2021, "Deep Reinforcement Learning at the
Edge of the Statistical Precipice"): interval estimates, comparisons, claims, tables, figures.

Pure functions over NumPy arrays; nothing here trains or evaluates a model.

Scores. A run is one (seed, episode) pair and its score one episode's normalised return. A
method's scores are either a matrix (runs, tasks), column j holding task j's runs, or a mapping
{task: array (seeds, episodes)} (or (runs,)), flattened seed-major into the runs axis; every task
of a method must hold the same number of runs. A `ScoreSet` is {method: one of those}; all its
methods must cover the same tasks (by name when given as mappings).

Estimates (rliable's definitions, `rliable.metrics`):
- mean: the mean over tasks of each task's mean over runs (`aggregate_mean`);
- IQM: the 25% trimmed mean of all runs of all tasks pooled (`aggregate_iqm`, i.e.
  `scipy.stats.trim_mean(x, 0.25, axis=None)`), robust to the few episodes that fall;
- median: the median over tasks of the task means (`aggregate_median`; one task: its mean);
- 95% CIs by the percentile stratified bootstrap (`library.get_interval_estimates`): each task's
  runs are resampled with replacement within that task (strata = tasks), `reps` times.

Comparisons (`compare`). "A beats B" is judged on the difference metric(A) - metric(B). When A
and B were evaluated from the same episode starts with the same seeds (run i of A and run i of B
share their start and training seed), `paired=True` resamples the same run indices for both
(`library.StratifiedBootstrap(a, b)`), so what the runs share cancels in the difference and its
CI narrows; `paired=False` resamples A and B independently
(`library.StratifiedIndependentBootstrap`). The probability of improvement P(A > B) is
`metrics.probability_of_improvement` (the Mann-Whitney U statistic per task over all run pairs,
averaged over tasks), its CI from `library.get_interval_estimates` on the pair (independent
resampling, as rliable defines it for this statistic).

Decisions (`decide`). The effect is the point estimate of the difference: True (A beats B) when
the CI's lower end > 0 and effect > min_effect; False (B beats A, the claim refuted) when the
CI's upper end < 0 and -effect > min_effect; otherwise None (undecided), its CI still reported.

Between training runs (`seed_level_ci`). rliable's bootstrap resamples runs = (seed, episode)
pairs as if every episode were an independent draw; episodes of one seed share its dataset order,
init and training noise, so with few seeds that CI leaves most of the variance between training
runs out. `seed_level_ci` is the two-level (hierarchical) bootstrap of the mean difference: seeds
are resampled with replacement (the same seeds for every task: one seed trains every task's
model), then each chosen seed's episodes within it. `compare` reports it beside rliable's CI for
{task: (seeds, episodes)} scores of >= 2 seeds; it decides nothing there (`decide` on it does).

Determinism: rliable's bootstraps draw their indices from NumPy's global RNG; every bootstrap
here seeds it with `seed` first and restores the caller's RNG state after, so a call's result
depends only on its inputs and `seed` (every method resampled with the same stream).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Mapping, Sequence, Union

import numpy as np

DEFAULT_REPS = 2000
MIN_REPS = 100
CONFIDENCE = 0.95
METRICS = ("iqm", "mean", "median")  # the order of one bootstrap's three statistics
METRIC_NAMES = {"iqm": "IQM", "mean": "Mean", "median": "Median"}
ALL_TASKS = "all tasks"

Scores = Union[np.ndarray, Mapping[str, np.ndarray]]
ScoreSet = Mapping[str, Scores]


# ------------------------------------------------------------------------------- validation

def check_reps(reps) -> int:
    """The bootstrap count; ValueError naming `bootstrap_reps` unless it is an int >= MIN_REPS."""
    if isinstance(reps, bool) or not isinstance(reps, (int, np.integer)) or reps < MIN_REPS:
        raise ValueError(f"bootstrap_reps: need an int >= {MIN_REPS} bootstrap resamples, got {reps!r}")
    return int(reps)


def check_min_effect(min_effect) -> float:
    """The smallest difference that counts; ValueError naming `claims_min_effect` unless finite >= 0."""
    try:
        v = float(min_effect)
    except (TypeError, ValueError):
        raise ValueError(f"claims_min_effect: must be a number >= 0, got {min_effect!r}") from None
    if isinstance(min_effect, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"claims_min_effect: must be a finite number >= 0, got {min_effect!r}")
    return v


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed: need an int in [0, 2**32), got {seed!r}")
    return int(seed)


def _check_confidence(confidence) -> float:
    if not isinstance(confidence, (float, int)) or isinstance(confidence, bool) or not 0 < confidence < 1:
        raise ValueError(f"confidence: need a number in (0, 1), got {confidence!r}")
    return float(confidence)


def _as_float_array(v, what: str) -> np.ndarray:
    try:
        return np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as e:  # ragged nested lists, strings
        raise ValueError(f"{what}: not a rectangular array of numbers ({e})") from None


def run_matrix(scores: Scores, what: str = "scores", tasks: Sequence[str] | None = None
               ) -> tuple[np.ndarray, tuple[str, ...], bool]:
    """(matrix (runs, tasks) float64, task names, whether the names were given).

    `scores` is a matrix (runs, tasks), named by `tasks` (else task_0, task_1, ...), or a mapping
    {task: (seeds, episodes) or (runs,)} flattened seed-major. Empty, ragged (tasks with different
    numbers of runs) or non-finite scores raise ValueError naming `what` and the task; so does a
    method with fewer than 2 runs (a bootstrap of one run has no spread).
    """
    if isinstance(scores, Mapping):
        if not scores:
            raise ValueError(f"{what}: no tasks")
        if tasks is not None and list(scores) != list(tasks):
            missing = sorted(set(tasks) - set(map(str, scores)))
            extra = sorted(set(map(str, scores)) - set(tasks))
            if missing or extra:
                raise ValueError(f"{what}: tasks {sorted(map(str, scores))} do not match {list(tasks)} "
                                 f"(missing {missing}, unexpected {extra})")
            scores = {t: scores[t] for t in tasks}
        cols, shapes = [], {}
        for t, v in scores.items():
            a = _as_float_array(v, f"{what}[{t!r}]")
            if a.ndim not in (1, 2):
                raise ValueError(f"{what}[{t!r}]: expected (seeds, episodes) or (runs,), got shape {a.shape}")
            shapes[str(t)] = a.shape
            cols.append(a.reshape(-1))
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{what}: ragged scores, every task needs the same (seeds, episodes): {shapes}")
        matrix, names, named = np.stack(cols, axis=1), tuple(shapes), True
    else:
        matrix = _as_float_array(scores, what)
        if matrix.ndim != 2:
            raise ValueError(f"{what}: expected a (runs, tasks) matrix, got shape {matrix.shape}")
        named = tasks is not None
        names = tuple(tasks) if named else tuple(f"task_{j}" for j in range(matrix.shape[1]))
        if len(names) != matrix.shape[1]:
            raise ValueError(f"{what}: {matrix.shape[1]} task columns but {len(names)} task names {list(names)}")
    if matrix.size == 0:
        raise ValueError(f"{what}: empty scores, shape {matrix.shape}")
    bad = np.argwhere(~np.isfinite(matrix))
    if bad.size:
        i, j = bad[0]
        raise ValueError(f"{what}: {len(bad)} non-finite score(s) (NaN or inf), the first at run {i} of task "
                         f"{names[j]!r}")
    if matrix.shape[0] < 2:
        raise ValueError(f"{what}: need >= 2 runs per task for a bootstrap, got {matrix.shape[0]}")
    return matrix, names, named


def score_matrices(scores: ScoreSet, tasks: Sequence[str] | None = None
                   ) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """({method: matrix (runs, tasks)}, task names) of a ScoreSet, every method's columns in the
    same task order (that of `tasks`, else of the first method given by name); methods covering
    different tasks raise ValueError naming the method."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError(f"scores: need a non-empty {{method: scores}} mapping, got {type(scores).__name__}")
    out: dict[str, np.ndarray] = {}
    names, named_names = (tuple(tasks), True) if tasks is not None else (None, False)
    for method, s in scores.items():
        what = f"scores[{method!r}]"
        # names fix a mapping's order and name a matrix's columns; a matrix's made-up names fix nothing
        given = names if named_names or (names is not None and not isinstance(s, Mapping)) else None
        m, t, named = run_matrix(s, what, given)
        if names is not None and m.shape[1] != len(names):
            raise ValueError(f"{what}: {m.shape[1]} tasks, expected {len(names)} ({list(names)})")
        if names is None or (named and not named_names):
            names, named_names = t, named
        out[str(method)] = m
    return out, names


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """NumPy's global RNG seeded with `seed` inside, the caller's state restored after (rliable's
    bootstraps draw from the global RNG)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _three(x: np.ndarray) -> np.ndarray:
    """rliable's (IQM, mean, median) of a (runs, tasks) matrix."""
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x), metrics.aggregate_median(x)])


def _trim_mean_columns(x: np.ndarray, cut: float = 0.25) -> np.ndarray:
    """Per-column `scipy.stats.trim_mean(x, cut, axis=0)`: each column sorted, int(cut * n) runs
    dropped from each end, the rest averaged (scipy's definition, without its per-call overhead,
    which dominated the bootstrap)."""
    n = x.shape[0]
    lo = int(cut * n)
    return np.sort(x, axis=0)[lo:n - lo].mean(axis=0)


def _three_and_per_task(x: np.ndarray) -> np.ndarray:
    """`_three(x)` then, per task j, `_three(x[:, [j]])`: (3 + 3 * tasks,)."""
    col_mean = x.mean(axis=0)
    per_task = np.stack([_trim_mean_columns(x), col_mean, col_mean], axis=1).reshape(-1)
    return np.concatenate([_three(x), per_task])


def _metric_fn(metric: str) -> Callable[[np.ndarray], float]:
    from rliable import metrics

    fns = {"mean": metrics.aggregate_mean, "iqm": metrics.aggregate_iqm, "median": metrics.aggregate_median}
    if metric not in fns:
        raise ValueError(f"metric: must be one of {sorted(fns)}, got {metric!r}")
    return fns[metric]


# -------------------------------------------------------------------------- interval estimates

def _entry(point: np.ndarray, ci: np.ndarray, k: int) -> dict:
    """{"iqm"|"mean"|"median": {"point", "ci"}} from the statistics at columns 3k .. 3k + 2."""
    return {name: {"point": float(point[3 * k + i]), "ci": [float(ci[0, 3 * k + i]), float(ci[1, 3 * k + i])]}
            for i, name in enumerate(METRICS)}


def interval_estimates(scores: ScoreSet, *, tasks: Sequence[str] | None = None, reps: int = DEFAULT_REPS,
                       seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """IQM, mean and median with stratified-bootstrap CIs, per (method, task) and per method over
    all tasks (the strata: tasks; the resampled units: runs = seeds x episodes).

    Returns {"tasks", "reps", "seed", "confidence", "bootstrap", "methods": {method: {"runs": n,
    "all": E, "tasks": {task: E}}}} where E = {"iqm"|"mean"|"median": {"point": x, "ci": [lo, hi]}}.
    """
    from rliable import library

    reps, seed, confidence = check_reps(reps), _check_seed(seed), _check_confidence(confidence)
    mats, names = score_matrices(scores, tasks)
    out = {"tasks": list(names), "reps": reps, "seed": seed, "confidence": confidence,
           "bootstrap": "percentile, stratified over tasks, runs resampled (rliable.library.get_interval_estimates)",
           "methods": {}}
    for method, m in mats.items():
        # one stratified bootstrap per method: task j's column of a resample is a resample of task
        # j's runs, so the per-task CIs come from the same resamples as the aggregate's
        with _seeded(seed):
            point, ci = library.get_interval_estimates({"x": m}, _three_and_per_task, reps=reps,
                                                       confidence_interval_size=confidence)
        point, ci = point["x"], ci["x"]
        out["methods"][method] = {"runs": int(m.shape[0]), "all": _entry(point, ci, 0),
                                  "tasks": {t: _entry(point, ci, j + 1) for j, t in enumerate(names)}}
    return out


def half_width(ci) -> float:
    """Half the width of a CI: (hi - lo) / 2, for a (lo, hi) pair or a {"ci": (lo, hi)} entry."""
    if isinstance(ci, Mapping):
        if "ci" not in ci:
            raise ValueError(f"half_width: expected a (lo, hi) pair or a mapping with 'ci', got keys {sorted(ci)}")
        ci = ci["ci"]
    lo, hi = _check_ci(ci)
    return (hi - lo) / 2.0


def _check_ci(ci) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in ci)
    except (TypeError, ValueError):
        raise ValueError(f"ci: expected a (lo, hi) pair of numbers, got {ci!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"ci: need finite lo <= hi, got ({lo}, {hi})")
    return lo, hi


# --------------------------------------------------------------------------------- comparisons

def compare(scores_a: Scores, scores_b: Scores, *, paired: bool = True, reps: int = DEFAULT_REPS, seed: int = 0,
            metric: str = "mean", tasks: Sequence[str] | None = None, names: tuple[str, str] = ("A", "B"),
            min_effect: float | None = None, confidence: float = CONFIDENCE) -> dict:
    """The evidence for "A beats B": metric(A) - metric(B) with its bootstrap CI, and P(A > B).

    `scores_a`, `scores_b`: (runs, tasks) matrices or {task: (seeds, episodes)} mappings over the
    same tasks (by name when both are mappings; a mapping is reordered to the other's order).
    `paired`: run i of A and run i of B came from the same episode start and seed, so both are
    resampled with the same indices (needs equal run counts); else independently. `min_effect`
    given: the result also holds `decided` = decide(result, min_effect).

    Returns {"a", "b" (the names), "metric", "paired", "tasks", "runs_a", "runs_b", "a_point",
    "b_point", "diff", "diff_ci": [lo, hi], "poi", "poi_ci": [lo, hi], "reps", "seed",
    "confidence"} (+ "min_effect", "decided"; for {task: (seeds >= 2, episodes)} paired mean
    comparisons also "diff_ci_seeds", `seed_level_ci`, and with `min_effect` "decided_seeds").
    """
    from rliable import library, metrics

    reps, seed, confidence = check_reps(reps), _check_seed(seed), _check_confidence(confidence)
    fn = _metric_fn(metric)
    if min_effect is not None:
        min_effect = check_min_effect(min_effect)
    if not isinstance(paired, (bool, np.bool_)):
        raise ValueError(f"paired: must be True or False, got {paired!r}")
    la, lb = names
    a, ta, named_a = run_matrix(scores_a, f"scores_a ({la})", tasks)
    order = ta if (named_a and tasks is None and isinstance(scores_b, Mapping)) else tasks
    try:
        b, tb, named_b = run_matrix(scores_b, f"scores_b ({lb})", order)
    except ValueError as e:
        if order is not None and isinstance(scores_b, Mapping) and "do not match" in str(e):
            raise ValueError(f"compare: mismatched tasks between {la} and {lb}: {e}") from None
        raise
    if a.shape[1] != b.shape[1] or (named_a and named_b and ta != tb):
        raise ValueError(f"compare: mismatched tasks between {la} {list(ta)} and {lb} {list(tb)}")
    if paired and a.shape[0] != b.shape[0]:
        raise ValueError(f"compare: a paired comparison needs the same runs (episode starts x seeds) for both, "
                         f"but {la} has {a.shape[0]} runs and {lb} {b.shape[0]}; pass paired=False")
    diff = lambda x, y: np.array([fn(x) - fn(y)])
    with _seeded(seed):
        if paired:
            bs = library.StratifiedBootstrap(a, b)
            dci = bs.conf_int(diff, reps=reps, size=confidence, method="percentile")
        else:
            _, d = library.get_interval_estimates({"d": [a, b]}, diff, reps=reps, confidence_interval_size=confidence)
            dci = d["d"]
    poi_fn = lambda x, y: np.array([metrics.probability_of_improvement(x, y)])
    with _seeded(seed):
        ppoint, pci = library.get_interval_estimates({"p": [a, b]}, poi_fn, reps=reps,
                                                     confidence_interval_size=confidence)
    pa, pb = float(fn(a)), float(fn(b))
    out = {"a": la, "b": lb, "metric": metric, "paired": bool(paired), "tasks": list(ta),
           "runs_a": int(a.shape[0]), "runs_b": int(b.shape[0]), "a_point": pa, "b_point": pb,
           "diff": pa - pb, "diff_ci": [float(dci[0, 0]), float(dci[1, 0])],
           "poi": float(ppoint["p"][0]), "poi_ci": [float(pci["p"][0, 0]), float(pci["p"][1, 0])],
           "reps": reps, "seed": seed, "confidence": confidence}
    if (metric == "mean" and paired and isinstance(scores_a, Mapping) and isinstance(scores_b, Mapping)
            and all(np.ndim(v) == 2 and np.shape(v)[0] >= 2 for v in (*scores_a.values(), *scores_b.values()))):
        out["diff_ci_seeds"] = seed_level_ci({t: scores_a[t] for t in ta}, {t: scores_b[t] for t in ta}, reps=reps,
                                             seed=seed, confidence=confidence)
    if min_effect is not None:
        out |= {"min_effect": min_effect, "decided": decide(out, min_effect)}
        if "diff_ci_seeds" in out:
            out["decided_seeds"] = decide(out["diff_ci_seeds"], min_effect, effect=out["diff"])
    return out


def seed_level_ci(scores_a: Mapping[str, np.ndarray], scores_b: Mapping[str, np.ndarray], *,
                  reps: int = DEFAULT_REPS, seed: int = 0, confidence: float = CONFIDENCE) -> list[float]:
    """The percentile CI of mean(A) - mean(B) (the mean over tasks of each task's mean) by a
    two-level bootstrap: `reps` times, draw seeds with replacement (one draw for all tasks), then
    within each drawn seed its episodes with replacement (per task); A and B paired (the same
    draws). Scores: {task: (seeds, episodes)}, the same shape for A and B and every task."""
    reps, seed, confidence = check_reps(reps), _check_seed(seed), _check_confidence(confidence)
    if not isinstance(scores_a, Mapping) or not isinstance(scores_b, Mapping) or set(scores_a) != set(scores_b) \
            or not scores_a:
        raise ValueError("seed_level_ci: need {task: (seeds, episodes)} mappings over the same tasks")
    pairs = {t: (_as_float_array(scores_a[t], f"scores_a[{t!r}]"), _as_float_array(scores_b[t], f"scores_b[{t!r}]"))
             for t in scores_a}
    shapes = {x.shape for pair in pairs.values() for x in pair}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] < 2:
        raise ValueError("seed_level_ci: every task needs the same (seeds >= 2, episodes) for A and B, got "
                         f"{ {t: (a.shape, b.shape) for t, (a, b) in pairs.items()} }")
    d = {t: a - b for t, (a, b) in pairs.items()}
    if not all(np.isfinite(x).all() for x in d.values()):
        raise ValueError("seed_level_ci: non-finite scores")
    S, E = next(iter(shapes))
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, S, (reps, S))
    stat = np.zeros(reps)
    for t in sorted(d):
        eps = rng.integers(0, E, (reps, S, E))
        stat += d[t][seeds[:, :, None], eps].mean(axis=(1, 2))
    stat /= len(d)
    q = (1 - confidence) / 2
    return [float(np.quantile(stat, q)), float(np.quantile(stat, 1 - q))]


def decide(ci, min_effect: float, *, effect: float | None = None) -> bool | None:
    """True (A beats B) when the CI's lower end > 0 and effect > min_effect; False (B beats A)
    when its upper end < 0 and -effect > min_effect; else None (undecided).

    `ci`: a `compare` result (its "diff_ci", and its "diff" as the effect) or a (lo, hi) pair with
    `effect` (the point estimate of the difference) given.
    """
    min_effect = check_min_effect(min_effect)
    if isinstance(ci, Mapping):
        if "diff_ci" not in ci or "diff" not in ci:
            raise ValueError(f"decide: a mapping must be a compare() result with 'diff' and 'diff_ci', got keys "
                             f"{sorted(ci)}")
        effect = ci["diff"] if effect is None else effect
        ci = ci["diff_ci"]
    lo, hi = _check_ci(ci)
    if effect is None:
        raise ValueError("decide: effect (the point estimate of the difference) is needed with a bare (lo, hi) CI")
    effect = float(effect)
    if not math.isfinite(effect):
        raise ValueError(f"decide: effect must be finite, got {effect}")
    if lo > 0 and effect > min_effect:
        return True
    if hi < 0 and -effect > min_effect:
        return False
    return None


# ------------------------------------------------------------------------------------ tables

def _methods_of(estimates) -> Mapping:
    if not isinstance(estimates, Mapping) or not isinstance(estimates.get("methods"), Mapping):
        raise ValueError("estimates: expected the dict interval_estimates() returns, with a 'methods' mapping")
    return estimates["methods"]


def _cell(e: Mapping, digits: int) -> str:
    lo, hi = e["ci"]
    return f"{e['point']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def estimates_markdown(estimates: Mapping, digits: int = 1) -> str:
    """A Markdown table of `interval_estimates`: method, task, mean [lo, hi], IQM [lo, hi], n runs;
    per task, then the aggregate over all tasks."""
    pct = round(100 * estimates.get("confidence", CONFIDENCE))
    lines = [f"| method | task | mean [{pct}% CI] | IQM [{pct}% CI] | n runs |", "|---|---|---|---|---|"]
    for method, m in _methods_of(estimates).items():
        rows = list(m["tasks"].items()) + [(ALL_TASKS, m["all"])]
        for task, e in rows:
            lines.append(f"| {method} | {task} | {_cell(e['mean'], digits)} | {_cell(e['iqm'], digits)} | "
                         f"{m['runs']} |")
    lines += ["", f"{pct}% percentile stratified bootstrap CIs ({estimates.get('reps')} resamples, seed "
              f"{estimates.get('seed')}, rliable); runs = seeds x episodes per task; mean: of the task means; "
              "IQM: 25% trimmed mean of the pooled runs."]
    return "\n".join(lines)


def claims_markdown(claims: Mapping[str, Mapping] | Sequence[Mapping], digits: int = 1) -> str:
    """A Markdown table of `compare` results: claim, A, B, diff [lo, hi], P(A>B) [lo, hi], decided."""
    items = list(claims.items()) if isinstance(claims, Mapping) else [(str(i + 1), c) for i, c in enumerate(claims)]
    lines = ["| claim | A | B | diff [CI] | P(A>B) [CI] | decided |", "|---|---|---|---|---|---|"]
    for name, c in items:
        d = _cell({"point": c["diff"], "ci": c["diff_ci"]}, digits)
        p = _cell({"point": c["poi"], "ci": c["poi_ci"]}, 2)
        decided = c.get("decided", "not decided (no min_effect)")
        lines.append(f"| {name} | {c['a']} | {c['b']} | {d} ({c['metric']}{', paired' if c['paired'] else ''}) | "
                     f"{p} | {decided} |")
    lines += ["", "decided: True when the difference's CI lies above 0 and the difference exceeds the minimum "
              "effect, False when its CI lies below 0 and -difference exceeds it, None otherwise."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- figures

def _pyplot():
    import sys

    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_png(fig, path, overwrite: bool) -> str:
    from mdt_jax.fileio import write_file_atomic

    plt = _pyplot()
    try:
        return write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"),
                                 overwrite=overwrite)
    finally:
        plt.close(fig)


def _check_png_path(path, overwrite: bool) -> None:
    import os

    if not str(path).endswith(".png"):
        raise ValueError(f"path: figures are PNG files, got {path!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def plot_intervals(estimates: Mapping, path, *, overwrite: bool = False) -> str:
    """rliable's `plot_interval_estimates` of `interval_estimates`: IQM, mean and median with their
    CIs, one row per (method, task) and per method over all tasks. Writes the PNG atomically."""
    from rliable import plot_utils

    _check_png_path(path, overwrite)
    points, intervals, labels, owner = {}, {}, [], {}
    for method, m in _methods_of(estimates).items():
        for task, e in list(m["tasks"].items()) + [(ALL_TASKS, m["all"])]:
            label = f"{method} [{task}]"
            labels.append(label)
            owner[label] = method
            points[label] = np.array([e[k]["point"] for k in METRICS])
            intervals[label] = np.array([[e[k]["ci"][0] for k in METRICS], [e[k]["ci"][1] for k in METRICS]])
    if not labels:
        raise ValueError("estimates: no methods to plot")
    import seaborn as sns

    _pyplot()
    methods = list(estimates["methods"])
    palette = sns.color_palette("colorblind", n_colors=len(methods))
    colors = {label: palette[methods.index(owner[label])] for label in labels}  # one colour per method
    fig, _ = plot_utils.plot_interval_estimates(points, intervals, [METRIC_NAMES[k] for k in METRICS],
                                                algorithms=labels[::-1], colors=colors, xlabel="normalized score",
                                                subfigure_width=3.6, row_height=0.4)
    return _save_png(fig, path, overwrite)


def plot_profile(scores: ScoreSet, path, *, tasks: Sequence[str] | None = None, tau=None,
                 reps: int = DEFAULT_REPS, seed: int = 0, overwrite: bool = False) -> str:
    """A performance profile, the fraction of runs (all tasks pooled) scoring above tau, with
    stratified-bootstrap CI bands (`library.create_performance_profile`,
    `plot_utils.plot_performance_profiles`); tau defaults to 101 points over the scores' range."""
    from rliable import library, plot_utils

    reps, seed = check_reps(reps), _check_seed(seed)
    _check_png_path(path, overwrite)
    mats, _ = score_matrices(scores, tasks)
    if tau is None:
        lo = min(float(m.min()) for m in mats.values())
        hi = max(float(m.max()) for m in mats.values())
        tau = np.linspace(lo, hi if hi > lo else lo + 1.0, 101)
    tau = _as_float_array(tau, "tau")
    if tau.ndim != 1 or tau.size < 2 or not np.all(np.isfinite(tau)) or np.any(np.diff(tau) <= 0):
        raise ValueError(f"tau: need >= 2 finite increasing thresholds, got {tau!r}")
    with _seeded(seed):
        profiles, cis = library.create_performance_profile(mats, tau, reps=reps)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(profiles, tau, performance_profile_cis=cis, ax=ax,
                                         xlabel=r"normalized score ($\tau$)",
                                         ylabel=r"fraction of runs with score $> \tau$")
    ax.legend(loc="upper right", fontsize="small")
    return _save_png(fig, path, overwrite)


def plot_curve(xs: Sequence[float], scores_per_x: Sequence[ScoreSet], path, *, tasks: Sequence[str] | None = None,
               metric: str = "mean", reps: int = DEFAULT_REPS, seed: int = 0, xlabel: str = "x",
               ylabel: str | None = None, overwrite: bool = False) -> str:
    """`metric` with CI bands over x (e.g. the P3 lerp curve over p): scores_per_x[i] is the
    ScoreSet measured at xs[i], every one with the same methods; rliable's
    `plot_sample_efficiency_curve` draws one line per method."""
    from rliable import library, plot_utils

    reps, seed = check_reps(reps), _check_seed(seed)
    fn = _metric_fn(metric)
    _check_png_path(path, overwrite)
    x = _as_float_array(xs, "xs")
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"xs: need a non-empty 1-D sequence of finite numbers, got {xs!r}")
    if len(scores_per_x) != x.size:
        raise ValueError(f"scores_per_x: {len(scores_per_x)} score sets for {x.size} xs")
    methods = None
    points: dict[str, list] = {}
    intervals: dict[str, list] = {}
    for i, s in enumerate(scores_per_x):
        try:
            mats, _ = score_matrices(s, tasks)
        except ValueError as e:
            raise ValueError(f"scores_per_x[{i}] (x={x[i]:g}): {e}") from None
        if methods is None:
            methods = list(mats)
        elif list(mats) != methods:
            raise ValueError(f"scores_per_x[{i}] (x={x[i]:g}): methods {list(mats)} differ from {methods}")
        for method, m in mats.items():
            with _seeded(seed):
                p, ci = library.get_interval_estimates({"m": m}, lambda v: np.array([fn(v)]), reps=reps)
            points.setdefault(method, []).append(float(p["m"][0]))
            intervals.setdefault(method, []).append(ci["m"][:, 0])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    plot_utils.plot_sample_efficiency_curve(
        x, {k: np.array(v) for k, v in points.items()}, {k: np.array(v).T for k, v in intervals.items()},
        algorithms=methods, ax=ax, xlabel=xlabel, ylabel=ylabel or f"{METRIC_NAMES[metric]} normalized score",
        labelsize="large", ticklabelsize="large")
    ax.legend(loc="best", fontsize="small")
    return _save_png(fig, path, overwrite)


__all__ = ["ALL_TASKS", "CONFIDENCE", "DEFAULT_REPS", "METRICS", "MIN_REPS", "ScoreSet", "Scores", "check_min_effect",
           "check_reps", "claims_markdown", "compare", "decide", "estimates_markdown", "half_width",
           "interval_estimates", "plot_curve", "plot_intervals", "plot_profile", "run_matrix", "score_matrices"]

