"""The study's report: per-seed rows pooled, the paper's claims decided with rliable's bootstrap
CIs (`mdt_jax.report`), the results table and the figures. Pure functions of the rows that
`mdt_jax.reproduce` produces; a finished study can be re-reported without running a stage.
"""
from __future__ import annotations

import json
import os

import numpy as np

from mdt_jax import envs

SETS = ("independent", "common", "pretrained", "large")  # the single-task DT sets, by init
P1_SUBSETS = {"attn,mlp": "attn+mlp", "blocks": "blocks"}

# ------------------------------------------------------------------------ pooling and claims

ROW_KEY = ("pipeline", "model", "method", "subset", "coefficients", "task")


def row_key(r: dict) -> tuple:
    """The identity of a row across seeds (ROW_KEY's fields, JSON-encoded)."""
    return tuple(json.dumps(r.get(k), sort_keys=True) for k in ROW_KEY)


def pool_rows(rows: list[dict]) -> list[dict]:
    """One row per (pipeline, model, method, subset, coefficients, task): returns pooled over every
    episode of every seed (mean and std of the pooled episodes)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(row_key(r), []).append(r)
    out = []
    for group in groups.values():
        n = np.array([r["episodes"] for r in group], float)
        mu = np.array([r["return_mean"] for r in group])
        sd = np.array([r["return_std"] for r in group])
        mean = float(np.sum(n * mu) / n.sum())
        std = float(np.sqrt(max(np.sum(n * (sd ** 2 + mu ** 2)) / n.sum() - mean ** 2, 0.0)))
        task = envs.get_task(group[0]["task"])
        scale = 100.0 / (task.expert_score - task.random_score)
        first = {k: v for k, v in group[0].items() if k not in ("seed", "checkpoint", "returns")}
        out.append(first | {
            "return_mean": mean, "return_std": std, "episodes": int(n.sum()),
            "seeds": sorted(r["seed"] for r in group),
            "return_over_target": mean / task.target_return, "return_over_target_std": std / task.target_return,
            "normalized": float(envs.normalized_score(task, mean)), "normalized_std": std * scale,
            "length_mean": float(np.sum(n * [r["length_mean"] for r in group]) / n.sum()),
            "nan_action_steps": int(sum(r.get("nan_action_steps", 0) for r in group)),
            "per_seed_returns": {str(r["seed"]): r["returns"] for r in sorted(group, key=lambda r: r["seed"])
                                 if "returns" in r},
            "v5_normalized": float(envs.v5_normalized_score(task.name, mean)),
            "per_seed_return_mean": [r["return_mean"] for r in sorted(group, key=lambda r: r["seed"])]})
    return out


def _pick(rows, tasks, **match) -> list[dict] | None:
    """One row per task matching `match` (own-task rows only), or None if any task lacks one."""
    got = {}
    for r in rows:
        if r.get("own_task", True) and all(r.get(k) == v for k, v in match.items()):
            got.setdefault(r["task"], r)
    return [got[t] for t in tasks] if all(t in got for t in tasks) else None


def score(rows: list[dict]) -> tuple[float, float]:
    """(mean normalized score over tasks, its standard error from the pooled episodes)."""
    m = float(np.mean([r["normalized"] for r in rows]))
    se = float(np.sqrt(sum(r["normalized_std"] ** 2 / r["episodes"] for r in rows)) / len(rows))
    return m, se


def seed_scores(rows: list[dict]) -> dict[int, float]:
    """{seed: mean normalized score over tasks} from pooled rows' per-seed returns."""
    per = [dict(zip(r["seeds"], envs.normalized_score(r["task"], np.asarray(r["per_seed_return_mean"]))))
           for r in rows if "per_seed_return_mean" in r]
    if len(per) != len(rows):
        return {}
    common = set.intersection(*(set(p) for p in per))
    return {s: float(np.mean([p[s] for p in per])) for s in sorted(common)}


BOOTSTRAP = {"reps": 2000, "seed": 0}  # set by `reproduce` from config.bootstrap_reps


def episode_scores(rows: list[dict]) -> dict[str, np.ndarray] | None:
    """{task: (seeds, episodes) D4RL-referenced normalised scores} from pooled rows, or None."""
    out = {}
    for r in rows:
        per = r.get("per_seed_returns")
        if not per:
            return None
        out[r["task"]] = np.asarray([envs.normalized_score(r["task"], np.asarray(per[k])) for k in sorted(per, key=int)])
    return out


def compare(a: list[dict] | None, b: list[dict] | None, min_effect: float = 0.0) -> tuple[bool | None, str, dict]:
    """"a beats b" from the per-episode scores, with rliable: the difference of the mean normalised
    score over tasks, its 95% stratified-bootstrap CI (runs = seed x episode, paired: both were
    evaluated on the same episode starts), the probability of improvement with its CI. Decided
    (True/False) when the CI excludes 0 and |difference| > `min_effect`, else None."""
    from mdt_jax import report

    if a is None or b is None:
        return None, "not run", {}
    sa, sb = episode_scores(a), episode_scores(b)
    if sa is None or sb is None:
        return None, "no per-episode scores", {}
    paired = all(sa[t].shape == sb[t].shape for t in sa)
    c = report.compare(sa, sb, paired=paired, reps=BOOTSTRAP["reps"], seed=BOOTSTRAP["seed"], min_effect=min_effect)
    lo, hi = c["diff_ci"]
    plo, phi = c["poi_ci"]
    text = (f"{c['a_point']:.2f} vs {c['b_point']:.2f} (difference {c['diff']:+.2f}, 95% CI [{lo:+.2f}, {hi:+.2f}]; "
            f"P(improvement) {c['poi']:.2f} [{plo:.2f}, {phi:.2f}])")
    stats = {"difference": c["diff"], "ci": [lo, hi], "half_width": (hi - lo) / 2,
             "probability_of_improvement": c["poi"], "poi_ci": [plo, phi], "paired": paired}
    if "diff_ci_seeds" in c:  # the two-level bootstrap over training seeds, then episodes (report.seed_level_ci)
        slo, shi = c["diff_ci_seeds"]
        text += f"; over seeds then episodes: CI [{slo:+.2f}, {shi:+.2f}]"
        stats |= {"ci_seeds": [slo, shi], "half_width_seeds": (shi - slo) / 2,
                  "supported_over_seeds": c["decided_seeds"]}
    return c["decided"], text, stats


def best_of_grid(rows: list[dict], tasks, method: str) -> list[dict] | None:
    """The P3 grid's best (per seed chosen on the selection episodes), its report-episode rows."""
    return _pick(rows, tasks, pipeline="p3_best", method=method)


def claims(rows: list[dict], tasks: list[str], min_effect: float = 0.0) -> dict:
    """C1..C6 from pooled rows, each with the difference of mean D4RL-referenced normalised scores
    over tasks, its 95% stratified-bootstrap CI over seeds x episodes (rliable, paired on the
    shared episode starts) and the probability of improvement; `supported` is True/False when the
    CI excludes 0 and |difference| > `min_effect` in the claimed / opposite direction, else None."""
    get = lambda **m: _pick(rows, tasks, **m)
    rnd = get(pipeline="baseline", model="random")
    p1 = {(s, m, sub): get(pipeline="p1", model=f"dt_{s}", method=m, subset=sub)
          for s in SETS for m in ("average", "fisher") for sub in P1_SUBSETS.values()}
    unmerged = {s: get(pipeline="single", model=f"dt_{s}", method="unmerged") for s in SETS}
    pre = get(pipeline="multi", model="mt", method="pre")
    out = {}

    def claim(key, a, b, what, more=""):
        v, e, st = compare(a, b, min_effect)
        out[key] = {"supported": v, "evidence": f"{what}: {e}{more}.", **st}
        return v, e

    # C1: the common-init attn+mlp average (the paper's merge) works: better than a random policy
    merged = p1["common", "average", "attn+mlp"]
    extra = ""
    if merged and unmerged["common"] and rnd:
        m, u, r0 = score(merged)[0], score(unmerged["common"])[0], score(rnd)[0]
        frac = (m - r0) / (u - r0) if abs(u - r0) > 1e-9 else float("nan")
        extra = (f"; the unmerged DTs score {u:.2f}, so the merge keeps {frac:.0%} of their gain over random"
                 if np.isfinite(frac) else "")
    claim("C1", merged, rnd, "P1 common-init attn+mlp average vs uniform-random policy, mean normalized score "
          f"over {', '.join(tasks)}", extra)
    # C2: a common (pre-trained, the paper's way) init merges better than independent inits; the
    # shared-random-seed "common" init is its own row
    pre_set = "pretrained" if p1["pretrained", "average", "attn+mlp"] else "common"
    _, ef = compare(p1[pre_set, "fisher", "attn+mlp"], p1["independent", "fisher", "attn+mlp"], min_effect)[:2]
    claim("C2", p1[pre_set, "average", "attn+mlp"], p1["independent", "average", "attn+mlp"],
          f"P1 attn+mlp average, {pre_set} init vs independent inits", f" (Fisher merge: {ef})")
    claim("C2_shared_seed", merged, p1["independent", "average", "attn+mlp"],
          "P1 attn+mlp average, a shared random init (one init seed) vs independent inits")
    # C3: more capacity merges better (both common init)
    u = "" if not (unmerged["large"] and unmerged["common"]) else \
        f" (unmerged: {compare(unmerged['large'], unmerged['common'])[1]})"
    claim("C3", p1["large", "average", "attn+mlp"], merged, "P1 common-init attn+mlp average, large vs small model", u)
    # C4: Fisher beats a uniform average
    e2 = compare(get(pipeline="p2", method="fisher"), get(pipeline="p2", method="average"), min_effect)[1]
    ei = compare(p1["independent", "fisher", "attn+mlp"], p1["independent", "average", "attn+mlp"], min_effect)[1]
    claim("C4", p1["common", "fisher", "attn+mlp"], merged, "P1 common init attn+mlp, Fisher vs average",
          f"; independent inits: {ei}; P2 Fisher vs average: {e2}")
    # C5: the subset matters: attn+mlp (each task keeps its own LayerNorms) vs every block param (LNs too)
    claim("C5", merged, p1["common", "average", "blocks"], "P1 common init average, merging attn+mlp (own "
          "LayerNorms kept) vs all block params incl. LayerNorms")
    # C6: merging per-task finetunes of the multi-task DT improves it
    bests = []
    for name in ("lerp", "task_arithmetic", "ties", "dare_ta"):
        b = best_of_grid(rows, tasks, name)
        if b and pre:
            bests.append(f"{name} best {b[0].get('selected_coefficients')}: {compare(b, pre)[1]}")
    claim("C6", get(pipeline="p2", method="average"), pre, "P2 average of the finetunes vs the multi-task DT "
          "before finetuning", ". P3 grid bests (chosen on the selection episodes, reported on the report "
          "episodes): " + ("; ".join(bests) or "not run"))
    # beyond the paper: each method against the paper's merges of the same models
    p2avg, p2f = get(pipeline="p2", method="average"), get(pipeline="p2", method="fisher")
    for method, model in sorted({(r["method"], r["model"]) for r in rows if r["pipeline"] == "beyond"}):
        mine = get(pipeline="beyond", method=method, model=model)
        if model.startswith("dt_"):  # a P1-style merge of a single-task set
            s_ = model[3:]
            refs = [(f"P1 {s_} average", p1.get((s_, "average", "attn+mlp"))),
                    (f"P1 {s_} Fisher", p1.get((s_, "fisher", "attn+mlp")))]
            if s_ == "independent":  # does it close the init gap (C2)?
                refs.append(("P1 common average", merged))
        else:
            refs = [("P2 average", p2avg), ("P2 Fisher", p2f)]
        for name, ref in refs:
            claim(f"beyond:{method}[{model}] vs {name}", mine, ref, f"{method} ({model}) vs {name}")
    rule = (f" Scores: mean D4RL-referenced normalized score over tasks; 95% stratified bootstrap CI over "
            f"seeds x episodes (rliable, {BOOTSTRAP['reps']} resamples); decided when the CI excludes 0 and "
            f"|difference| > {min_effect:g}.")
    return {k: v | {"evidence": v["evidence"] + rule} for k, v in out.items()}


# ------------------------------------------------------------------------ table and figures

def labelled(rows: list[dict], tasks) -> list[tuple[str, list[dict]]]:
    """(label, one row per task) for every own-task model/method, in table order; P3 grids by their best."""
    out = []
    seen = []
    for r in rows:
        if r["pipeline"] in ("p3", "p3_best") or not r.get("own_task", True):
            continue
        if r["pipeline"] == "multi" and r["model"].startswith("ft["):
            key = ("multi", "ft", "finetuned", None)
            match = dict(pipeline="multi", method="finetuned")
        else:
            key = (r["pipeline"], r["model"], r["method"], r.get("subset"))
            match = dict(pipeline=r["pipeline"], model=r["model"], method=r["method"], subset=r.get("subset"))
        if key in seen:
            continue
        seen.append(key)
        got = _pick(rows, tasks, **match)
        if got:
            label = {"baseline": "random policy", "single": f"DT {r['model'][3:]} init (unmerged)",
                     "multi": "multi-task DT" if r["model"] == "mt" else "per-task finetunes (unmerged)"}.get(
                r["pipeline"])
            if r["pipeline"] == "p1":
                label = f"P1 {r['model'][3:]} {r['method']} [{r['subset']}]"
            elif r["pipeline"] == "p2":
                label = f"P2 {r['method']}"
            elif r["pipeline"] == "beyond":
                label = f"beyond: {r['method']}" + (f" [{r['model'][3:]}]" if r["model"].startswith("dt_") else "")
            out.append((label, got))
    out.sort(key=lambda lg: _rank(lg[1][0]))
    for name in ("lerp", "task_arithmetic", "ties", "dare_ta"):
        b = best_of_grid(rows, tasks, name)
        if b:
            c = ", ".join(f"{k}={v:g}" for k, v in (b[0].get("selected_coefficients") or {}).items())
            out.append((f"P3 {name} best (held-out choice; seed {b[0]['seeds'][0]}: {c})", b))
    return out


def _rank(r: dict) -> tuple:
    """Table order: random; per init set its unmerged DTs then its P1 merges; multi-task; P2."""
    pipe = ("baseline", "single", "p1", "multi", "p2", "beyond").index(r["pipeline"])
    model = r["model"]
    sets = {f"dt_{s}": i for i, s in enumerate(SETS)}
    methods = ("average", "fisher", "average+finetune", "fisher+finetune")
    if r["pipeline"] in ("single", "p1"):
        sub = list(P1_SUBSETS.values()).index(r.get("subset") or "attn+mlp")
        return (1, sets.get(model, 9), pipe, methods.index(r["method"]) if r["method"] in methods else 0, sub)
    return (pipe, 0 if model == "mt" else 1, methods.index(r["method"]) if r["method"] in methods else 0)


def interval_table(rows: list[dict], tasks) -> dict:
    """rliable interval estimates (mean, IQM, median with 95% stratified bootstrap CIs over seeds x
    episodes) of every labelled model/method, per task and over tasks (`report.interval_estimates`)."""
    from mdt_jax import report

    scores = {}
    for label, got in labelled(rows, tasks):
        sc = episode_scores(got)
        if sc is not None and len({v.shape for v in sc.values()}) == 1:
            scores[label] = sc
    if not scores:
        return {}
    return report.interval_estimates(scores, tasks=list(tasks), reps=BOOTSTRAP["reps"], seed=BOOTSTRAP["seed"])


def results_markdown(rows: list[dict], tasks, claim: dict, note: str = "", estimates: dict | None = None) -> str:
    head = ["model / method"] + [f"{t}: return/target" for t in tasks] + [f"{t}: normalized" for t in tasks] + \
        ["mean normalized [95% CI]", "IQM [95% CI]", "mean v5-normalized"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, got in labelled(rows, tasks):
        cells = [f"{r['return_over_target']:.3f} ± {r['return_over_target_std']:.3f}" for r in got]
        cells += [f"{r['normalized']:.1f} ± {r['normalized_std']:.1f}" for r in got]
        m, se = score(got)
        e = (estimates or {}).get("methods", {}).get(label)
        ci = lambda k: f"{e['all'][k]['point']:.1f} [{e['all'][k]['ci'][0]:.1f}, {e['all'][k]['ci'][1]:.1f}]" if e else "-"
        v5 = float(np.mean([r.get("v5_normalized", np.nan) for r in got]))
        lines.append("| " + " | ".join([label] + cells + [ci("mean"), ci("iqm"), f"{v5:.1f}"]) + " |")
    eps = sorted({r["episodes"] for r in rows})
    seeds = sorted({s for r in rows for s in r["seeds"]})
    lines.append("")
    lines.append(f"Per task: mean ± std over {eps} episodes pooled over seeds {seeds}. Mean and IQM over tasks "
                 "with 95% stratified bootstrap CIs over seeds x episodes (rliable). Normalized: "
                 "D4RL-referenced, 100 (R - random) / (expert - random) with D4RL's gym-v2 reference returns; "
                 "v5-normalized: the same with Gymnasium-v5 reference returns measured here "
                 "(mdt_jax/envs/v5_reference.json: uniform-random policy and the committed expert). P3 bests: "
                 "chosen per seed on selection episodes (disjoint reset seeds), reported on the report "
                 "episodes." + note)
    lines += ["", "| claim | supported | difference [95% CI] | P(improvement) [95% CI] | over seeds: CI, decided "
              "| evidence |", "|---|---|---|---|---|---|"]
    for k, v in claim.items():
        d = f"{v['difference']:+.2f} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]" if "ci" in v else "-"
        p = f"{v['probability_of_improvement']:.2f} [{v['poi_ci'][0]:.2f}, {v['poi_ci'][1]:.2f}]" if "ci" in v else "-"
        sd = f"[{v['ci_seeds'][0]:+.2f}, {v['ci_seeds'][1]:+.2f}], {v['supported_over_seeds']}" if "ci_seeds" in v \
            else "-"
        lines.append(f"| {k} | {v['supported']} | {d} | {p} | {sd} | {v['evidence']} |")
    lines += ["", "Over seeds: the two-level bootstrap (training seeds resampled, then each one's episodes; "
              "mdt_jax.report.seed_level_ci), which keeps the variance between training runs that the "
              "runs = seeds x episodes CI leaves out when seeds are few; reported beside `supported`, which "
              "stays rliable's rule."]
    return "\n".join(lines)


def write_figures(rows: list[dict], tasks, workdir: str, estimates: dict | None = None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = labelled(rows, tasks)
    fig, ax = plt.subplots(figsize=(min(16, 6 + 0.15 * len(tasks) * len(groups)), 5))
    width = 0.8 / max(len(groups), 1)
    cmap = plt.get_cmap("tab20")
    for i, (label, got) in enumerate(groups):
        x = np.arange(len(tasks)) + (i - (len(groups) - 1) / 2) * width
        ax.bar(x, [r["normalized"] for r in got], width, yerr=[r["normalized_std"] for r in got],
               label=label, color=cmap(i % 20), capsize=2)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("normalized score (mean ± std)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("every model and merge, per task (mean ± std over episodes and seeds)")
    fig.tight_layout()
    paths.append(os.path.join(workdir, "results_bars.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    lerp = [r for r in rows if r["pipeline"] == "p3" and r["method"] == "lerp"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in tasks:
        pts = sorted((r["coefficients"]["p"], r["normalized"], r["normalized_std"]) for r in lerp if r["task"] == t)
        if pts:
            p, m, s = map(np.asarray, zip(*pts))
            ax.errorbar(p, m, yerr=s, marker="o", capsize=3, label=t)
    ax.set_xlabel("p: trunk from the multi-task DT (0) to the P2 average (1); heads finetuned")
    ax.set_ylabel("normalized score")
    ax.set_title("P3 interpolation curve (mean ± std over episodes and seeds)")
    ax.legend(loc="best")
    fig.tight_layout()
    paths.append(os.path.join(workdir, "results_lerp.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    from mdt_jax import report

    if estimates:
        paths.append(report.plot_intervals(estimates, os.path.join(workdir, "results_intervals.png"), overwrite=True))
        scores = {label: episode_scores(got) for label, got in groups if label in estimates["methods"]}
        paths.append(report.plot_profile(scores, os.path.join(workdir, "results_profile.png"), tasks=list(tasks),
                                         reps=BOOTSTRAP["reps"], overwrite=True))
    ps = sorted({r["coefficients"]["p"] for r in lerp})
    curve = [_pick(rows, tasks, pipeline="p3", method="lerp", coefficients={"p": p}) for p in ps]
    if ps and all(curve):
        paths.append(report.plot_curve(ps, [{"P3 lerp": episode_scores(c)} for c in curve],
                                       os.path.join(workdir, "results_lerp_ci.png"), tasks=list(tasks),
                                       reps=BOOTSTRAP["reps"], xlabel="p (multi-task DT -> P2 average)",
                                       overwrite=True))
    return paths


def results_table(rows: list[dict], keys=("task", "episodes", "return_mean", "return_std", "return_over_target",
                                          "normalized", "length_mean")) -> str:
    """A Markdown table of result rows."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
