"""The main job: the paper's whole study on one config, every stage cached (configs/quickstart.py,
configs/paper.py).

    python -m launch.reproduce --config=configs/quickstart.py --workdir=runs/quickstart

Stages, each kept under WORKDIR and skipped when the same command runs again (a killed stage
resumes: training from its last checkpoint, merges from their cached evaluations):

1. data: `run.collect_dataset` per task, quality `config.data.quality` -> data/<task>-<quality>.hdf5
2. per seed s (seed_<s>/):
   - single-task DTs, one set per init: `independent` (a different init seed per task), `common`
     (one init seed for every task: every same-shaped param, the trunk included, starts equal;
     `config.init_seed` of configs/train.py), and `large` (common init, `config.large` model
     overrides; skipped when `config.large` is empty). Within a seed, the sets share each task's
     data order and dropout (`seed`), so only the init differs -> dt_<set>_<task>/
   - the Fisher of each on its own data -> fisher_<set>_<task>/
   - P1 (`run.merge_from_config`): attn+mlp of each set, average and Fisher; for the common set
     also the average of all the blocks' params, LayerNorms included (`blocks`, claim C5) ->
     p1_<set>_<method>_<subset>/; with `config.p1_finetune.num_steps` > 0, the common-init
     merges are finetuned per task with attn+mlp frozen -> p1ft_<method>_<task>/
   - the multi-task DT -> mt/, its per-task finetunes (ln_f and timestep frozen, init_reg) ->
     ft_<task>/, their Fishers on their own task -> fisher_ft_<task>/
   - P3 (with P2 average inside) -> p3/, and P2 Fisher -> p2_fisher/
   - a uniform-random policy from the same episode starts -> stages/random.json
3. rows pooled over seeds, claims C1..C6 decided from the numbers, results.json, results.md and
   figures (results_bars.png, results_lerp.png).
"""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np

import ml_collections

from mdt_jax import checkpoint, envs
from mdt_jax.fileio import write_json_atomic
from mdt_jax.run import (_evaluate_rows, _plain, _stage, collect_dataset, merge_from_config, split_list,
                         train_from_config)

SETS = ("independent", "common", "pretrained", "large")
P1_SUBSETS = {"attn,mlp": "attn+mlp", "blocks": "blocks"}
Z = 2.0  # a difference counts when it exceeds Z standard errors


def _log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ config checks

def parse_seeds(value) -> list[int]:
    try:
        seeds = [int(s) for s in split_list(value)]
    except ValueError:
        raise ValueError(f"config.seeds: expected comma-separated ints, got {value!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"config.seeds: need distinct ints >= 0, got {value!r}")
    return seeds


def check_config(config) -> tuple[list[str], list[int]]:
    tasks = split_list(config.tasks)
    if len(tasks) < 2:
        raise ValueError(f"config.tasks: need at least 2 tasks to merge, got {config.tasks!r}")
    for t in tasks:
        if t not in envs.TASKS:
            raise ValueError(f"config.tasks: unknown task {t!r}; known: {sorted(envs.TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"config.tasks: repeated task in {config.tasks!r}")
    for f in ("episodes", "max_steps"):
        if not isinstance(config.eval[f], int) or config.eval[f] <= 0:
            raise ValueError(f"config.eval.{f}: must be a positive int, got {config.eval[f]!r}")
    for f in ("num_steps", "finetune_steps"):
        if not isinstance(config.multi[f], int) or config.multi[f] <= 0:
            raise ValueError(f"config.multi.{f}: must be a positive int, got {config.multi[f]!r}")
    if config.p1_finetune.num_steps < 0:
        raise ValueError(f"config.p1_finetune.num_steps: must be >= 0, got {config.p1_finetune.num_steps}")
    return tasks, parse_seeds(config.seeds)


# --------------------------------------------------------------------------------- the stages

def _train(config, workdir: str, *, task: str, dataset: str, seed: int, init_seed: int = -1, model=None,
           num_steps=None, init_from: str = "", train=None, init_trunk_from: str = "") -> str:
    """train_from_config on a copy of `config.train` with the given overrides; returns the model folder."""
    tc = config.train.copy_and_resolve_references()
    with tc.unlocked():
        tc.task, tc.dataset, tc.seed, tc.init_seed, tc.init_from = task, dataset, seed, init_seed, init_from
        tc.init_trunk_from = init_trunk_from
        if num_steps is not None:
            tc.num_steps = num_steps
        for k, v in (model or {}).items():
            tc.model[k] = v
        for k, v in (train or {}).items():
            tc.train[k] = v
    if os.path.exists(os.path.join(workdir, "model", checkpoint.META_FILE)):
        return os.path.join(workdir, "model")
    _log(f"train {os.path.basename(workdir)}")
    return train_from_config(tc, workdir)


def _fisher(config, workdir: str, model: str, dataset: str, seed: int, spec_info: bool = False) -> str:
    from mdt_jax.fisher import META_FILE, fisher_from_config

    if not os.path.exists(os.path.join(workdir, META_FILE)):
        _log(f"fisher {os.path.basename(workdir)}")
        fc = config.fisher.copy_and_resolve_references()
        with fc.unlocked():
            fc.checkpoint, fc.dataset, fc.seed, fc.spec_info = model, dataset, seed, spec_info
        fisher_from_config(fc, workdir)
    return workdir


def _merge(config, workdir: str, seed: int, **fields) -> list[dict]:
    """merge_from_config with `fields` over `config.merge`; its rows (cached in merge.json)."""
    path = os.path.join(workdir, "merge.json")
    if not os.path.exists(path):
        _log(f"merge {os.path.basename(workdir)}")
        mc = config.merge.copy_and_resolve_references()
        with mc.unlocked():
            for k, v in fields.items():
                mc[k] = v
            mc.seed = seed
            mc.eval = _own_task_eval(config)
        merge_from_config(mc, workdir)
    with open(path) as f:
        return json.load(f)["rows"]


def _own_task_eval(config) -> ml_collections.ConfigDict:
    """configs/merge.py's eval settings from `config.eval`: single-task models on their own task only."""
    return ml_collections.ConfigDict(_plain(config.eval) | {"own_task": True})


def random_policy_rows(tasks, *, episodes: int, max_steps: int, seed: int) -> list[dict]:
    """A uniform-random policy (the 'random' data's policy) from the evaluator's episode starts."""
    from mdt_jax import evaluate as ev
    from mdt_jax.behaviour.collect import uniform_policy

    rows = []
    for name in tasks:
        task = envs.get_task(name)
        qpos, qvel = ev.reset_states(task, episodes, seed)
        env = envs.NativeBatchEnv(task, episodes)
        obs = env.set_state(qpos, qvel)
        policy, rng = uniform_policy(task.act_dim), np.random.default_rng([seed, 1])
        ret, length, done = np.zeros(episodes), np.zeros(episodes, np.int64), np.zeros(episodes, bool)
        for _ in range(max_steps):
            obs, r, term, trunc, _info = env.step(policy(obs, rng))
            ret += np.where(done, 0.0, r)
            length += ~done
            done |= term | trunc
            if done.all():
                break
        res = ev.TaskResult(name, ret[None], length[None], np.zeros((1, episodes), np.int64), task.target_return)
        rows.append(res.summary())
    return rows


def _tag(rows: list[dict], seed: int, **fields) -> list[dict]:
    return [r | fields | {"seed": seed} for r in rows]


def pretrain(config, workdir: str, tasks: list[str]) -> str:
    """The embedded pre-trained common init: a multi-task DT with the single-task DTs' trunk shape,
    trained on every task's `config.pretrain.quality` data (default: uniform-random-policy data,
    which no target DT trains on), once per study (WORKDIR/pretrain/mt); "" when switched off."""
    pc = config.get("pretrain", None)
    if pc is None or not pc.num_steps:
        return ""
    if pc.quality == config.data.quality:
        raise ValueError(f"config.pretrain.quality: {pc.quality!r} is the target DTs' own data quality; the "
                         "pretrained init must come from data they never see")
    paths = []
    for i, t in enumerate(tasks):
        path = os.path.join(workdir, "data", f"{t}-{pc.quality}.hdf5")
        if not os.path.exists(path):
            _log(f"data {t}-{pc.quality} (pretraining)")
        paths.append(collect_dataset(t, pc.quality, pc.transitions, path, seed=config.data.seed + 100 + i,
                                     num_envs=config.data.num_envs))
    return _train(config, os.path.join(workdir, "pretrain", "mt"), task=",".join(tasks), dataset=",".join(paths),
                  seed=7, init_seed=7, num_steps=pc.num_steps, train={"batch_size": pc.batch_size})


def run_seed(config, workdir: str, tasks: list[str], data: dict[str, str], seed: int,
             pretrained: str = "") -> list[dict]:
    """Every stage of one seed; rows in the results schema (one per model x method x task)."""
    sdir = os.path.join(workdir, f"seed_{seed}")
    rows: list[dict] = []
    sets = [s for s in SETS if (s != "large" or len(config.large)) and (s != "pretrained" or pretrained)]
    models: dict[str, list[str]] = {}
    for name in sets:
        common_init = name != "independent"
        models[name] = [_train(config, os.path.join(sdir, f"dt_{name}_{t}"), task=t, dataset=data[t],
                               seed=100 * seed + i, init_seed=100 * seed + (50 if common_init else 10 + i),
                               model=_plain(config.large) if name == "large" else None,
                               init_trunk_from=pretrained if name == "pretrained" else "")
                        for i, t in enumerate(tasks)]
    for name in sets:
        fishers = [_fisher(config, os.path.join(sdir, f"fisher_{name}_{t}"), m, data[t], seed)
                   for t, m in zip(tasks, models[name])]
        variants = [("average", "attn,mlp"), ("fisher", "attn,mlp")] + ([("average", "blocks")] if name == "common"
                                                                          else [])
        for k, (method, subset) in enumerate(variants):
            out = _merge(config, os.path.join(sdir, f"p1_{name}_{method}_{subset.replace(',', '+')}"), seed,
                         pipeline="p1", method=method, subset=subset, checkpoints=",".join(models[name]),
                         fishers=",".join(fishers), eval_inputs=k == 0)
            for r in out:
                kind, own = re.fullmatch(r"(.+)\[(.+)\]", r["model"]).groups()
                assert own == r["task"], (own, r["task"])  # own_task evaluation
                if kind == "unmerged":
                    rows += _tag([r], seed, pipeline="single", model=f"dt_{name}", method="unmerged")
                else:
                    rows += _tag([r], seed, pipeline="p1", model=f"dt_{name}", method=method,
                                 subset=P1_SUBSETS[subset])
                    if name == "common" and subset == "attn,mlp" and config.p1_finetune.num_steps:
                        rows += _p1_finetune(config, sdir, r, method, data, seed)
    # the multi-task DT, its finetunes, P2 and P3
    mt = _train(config, os.path.join(sdir, "mt"), task=",".join(tasks), dataset=",".join(data[t] for t in tasks),
                seed=100 * seed + 90, model=_plain(config.multi.model), num_steps=config.multi.num_steps,
                train={"batch_size": config.multi.batch_size})
    from mdt_jax.pipelines import P2_FINETUNE
    ft_train = {k: ",".join(v) if isinstance(v, tuple) else v for k, v in P2_FINETUNE.items()} \
        | _plain(config.multi.finetune_train)
    fts = [_train(config, os.path.join(sdir, f"ft_{t}"), task=t, dataset=data[t], seed=100 * seed + 91 + i,
                  init_from=mt, num_steps=config.multi.finetune_steps, train=ft_train)
           for i, t in enumerate(tasks)]
    ft_fishers = [_fisher(config, os.path.join(sdir, f"fisher_ft_{t}"), m, data[t], seed, spec_info=True)
                  for t, m in zip(tasks, fts)]
    for r in _merge(config, os.path.join(sdir, "p3"), seed, pipeline="p3", method="average", base=mt,
                    checkpoints=",".join(fts), eval_inputs=True):
        m = r["model"]
        if m == "pre":
            rows += _tag([r], seed, pipeline="multi", model="mt", method="pre")
        elif m.startswith("finetune_"):
            t = m[len("finetune_"):]
            rows += _tag([r], seed, pipeline="multi", model=f"ft[{t}]", method="finetuned",
                         own_task=t == r["task"])
        elif m.startswith("p2_"):
            rows += _tag([r], seed, pipeline="p2", model="mt_finetunes", method=m[3:])
        else:
            rows += _tag([r], seed, pipeline="p3", model="mt_finetunes", method=m[3:])
    for r in _merge(config, os.path.join(sdir, "p2_fisher"), seed, pipeline="p2", method="fisher",
                    checkpoints=",".join(fts), fishers=",".join(ft_fishers), eval_inputs=False):
        rows += _tag([r], seed, pipeline="p2", model="mt_finetunes", method="fisher")
    rows += _tag(_stage(sdir, "random", lambda: random_policy_rows(
        tasks, episodes=config.eval.episodes, max_steps=config.eval.max_steps, seed=seed)), seed,
        pipeline="baseline", model="random", method="uniform")
    return rows


def _p1_finetune(config, sdir: str, row: dict, method: str, data: dict, seed: int) -> list[dict]:
    """The paper's P1 second step: the merged attn+mlp frozen, the rest finetuned on the task."""
    from mdt_jax.pipelines import P1_FREEZE

    t = row["task"]
    wd = os.path.join(sdir, f"p1ft_{method}_{t}")
    model = _train(config, wd, task=t, dataset=data[t], seed=100 * seed + 70, init_from=row["checkpoint"],
                   num_steps=config.p1_finetune.num_steps, train={"freeze": ",".join(P1_FREEZE)})
    ec = config.merge.copy_and_resolve_references()
    with ec.unlocked():
        ec.seed, ec.eval = seed, _own_task_eval(config)
    cfg, params, meta = checkpoint.load(model)
    out = _stage(wd, "eval", lambda: _evaluate_rows(cfg, params, meta, ec))
    return _tag(out, seed, pipeline="p1", model="dt_common", method=f"{method}+finetune", subset="attn+mlp")


# ------------------------------------------------------------------------ pooling and claims

ROW_KEY = ("pipeline", "model", "method", "subset", "coefficients", "task")


def _key(r: dict) -> tuple:
    return tuple(json.dumps(r.get(k), sort_keys=True) for k in ROW_KEY)


def pool_rows(rows: list[dict]) -> list[dict]:
    """One row per (pipeline, model, method, subset, coefficients, task): returns pooled over every
    episode of every seed (mean and std of the pooled episodes)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_key(r), []).append(r)
    out = []
    for group in groups.values():
        n = np.array([r["episodes"] for r in group], float)
        mu = np.array([r["return_mean"] for r in group])
        sd = np.array([r["return_std"] for r in group])
        mean = float(np.sum(n * mu) / n.sum())
        std = float(np.sqrt(max(np.sum(n * (sd ** 2 + mu ** 2)) / n.sum() - mean ** 2, 0.0)))
        task = envs.get_task(group[0]["task"])
        scale = 100.0 / (task.expert_score - task.random_score)
        first = {k: v for k, v in group[0].items() if k not in ("seed", "checkpoint")}
        out.append(first | {
            "return_mean": mean, "return_std": std, "episodes": int(n.sum()),
            "seeds": sorted(r["seed"] for r in group),
            "return_over_target": mean / task.target_return, "return_over_target_std": std / task.target_return,
            "normalized": float(envs.normalized_score(task, mean)), "normalized_std": std * scale,
            "length_mean": float(np.sum(n * [r["length_mean"] for r in group]) / n.sum()),
            "nan_action_steps": int(sum(r.get("nan_action_steps", 0) for r in group)),
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


def compare(a: list[dict] | None, b: list[dict] | None, min_effect: float = 0.0) -> tuple[bool | None, str]:
    """True if a beats b by more than Z standard errors and `min_effect` normalized points, False if
    b beats a so, None otherwise (within noise, or too small to matter). The standard error is the
    larger of the episodes' (pooled over seeds) and, with 2+ seeds, that of the per-seed paired
    differences (the seeds of a pair share data order and dropout), which carries training noise."""
    if a is None or b is None:
        return None, "not run"
    (ma, sa), (mb, sb) = score(a), score(b)
    se = float(np.hypot(sa, sb))
    sa_, sb_ = seed_scores(a), seed_scores(b)
    paired = [sa_[s] - sb_[s] for s in sa_ if s in sb_]
    if len(paired) >= 2:
        se = max(se, float(np.std(paired, ddof=1) / np.sqrt(len(paired))))
    d = ma - mb
    verdict = None if abs(d) <= max(Z * se, min_effect) else bool(d > 0)
    return verdict, f"{ma:.2f} vs {mb:.2f} (difference {d:+.2f} ± {se:.2f} s.e.)"


def best_of_grid(rows: list[dict], tasks, method: str) -> list[dict] | None:
    """The P3 grid point with the best mean normalized score (chosen on the evaluation episodes)."""
    coeffs = {json.dumps(r.get("coefficients"), sort_keys=True) for r in rows
              if r["pipeline"] == "p3" and r["method"] == method}
    cands = [_pick(rows, tasks, pipeline="p3", method=method, coefficients=json.loads(c)) for c in sorted(coeffs)]
    cands = [c for c in cands if c]
    return max(cands, key=lambda c: score(c)[0]) if cands else None


def claims(rows: list[dict], tasks: list[str], min_effect: float = 0.0) -> dict:
    """C1..C6 from pooled rows. Scores are D4RL-normalized, averaged over tasks; `supported` is
    True/False when the difference exceeds both 2 standard errors (episodes x seeds pooled) and
    `min_effect` normalized points in the claimed / opposite direction, else None."""
    get = lambda **m: _pick(rows, tasks, **m)
    cmp = lambda a, b: compare(a, b, min_effect)
    rnd = get(pipeline="baseline", model="random")
    p1 = {(s, m, sub): get(pipeline="p1", model=f"dt_{s}", method=m, subset=sub)
          for s in SETS for m in ("average", "fisher") for sub in P1_SUBSETS.values()}
    unmerged = {s: get(pipeline="single", model=f"dt_{s}", method="unmerged") for s in SETS}
    pre = get(pipeline="multi", model="mt", method="pre")
    out = {}

    # C1: the common-init attn+mlp average (the paper's merge) works: better than a random policy
    merged = p1["common", "average", "attn+mlp"]
    v, e = cmp(merged, rnd)
    extra = ""
    if merged and unmerged["common"] and rnd:
        m, u, r0 = score(merged)[0], score(unmerged["common"])[0], score(rnd)[0]
        frac = (m - r0) / (u - r0) if abs(u - r0) > 1e-9 else float("nan")
        extra = (f"; the unmerged DTs score {u:.2f}, so the merge keeps {frac:.0%} of their gain over random"
                 if np.isfinite(frac) else "")
    out["C1"] = {"supported": v, "evidence": f"P1 common-init attn+mlp average vs uniform-random policy, mean "
                                             f"normalized score over {', '.join(tasks)}: {e}{extra}."}
    # C2: common init merges better than independent inits
    v, e = cmp(merged, p1["independent", "average", "attn+mlp"])
    vf, ef = cmp(p1["common", "fisher", "attn+mlp"], p1["independent", "fisher", "attn+mlp"])
    out["C2"] = {"supported": v, "evidence": f"P1 attn+mlp average, common vs independent init: {e} "
                                             f"(Fisher merge: {ef})."}
    # C3: more capacity merges better (both common init)
    v, e = cmp(p1["large", "average", "attn+mlp"], merged)
    u = "" if not (unmerged["large"] and unmerged["common"]) else \
        f" (unmerged: {compare(unmerged['large'], unmerged['common'])[1]})"
    out["C3"] = {"supported": v, "evidence": f"P1 common-init attn+mlp average, large vs small model: {e}{u}."}
    # C4: Fisher beats a uniform average
    v, e = cmp(p1["common", "fisher", "attn+mlp"], merged)
    v2, e2 = cmp(get(pipeline="p2", method="fisher"), get(pipeline="p2", method="average"))
    vi, ei = cmp(p1["independent", "fisher", "attn+mlp"], p1["independent", "average", "attn+mlp"])
    out["C4"] = {"supported": v, "evidence": f"P1 common init attn+mlp, Fisher vs average: {e}; independent "
                                             f"inits: {ei}; P2 Fisher vs average: {e2}."}
    # C5: the subset matters: attn+mlp (each task keeps its own LayerNorms) vs every block param (LNs too)
    v, e = cmp(merged, p1["common", "average", "blocks"])
    out["C5"] = {"supported": v, "evidence": "P1 common init average, merging attn+mlp (own LayerNorms kept) vs "
                                             f"all block params incl. LayerNorms: {e}."}
    # C6: merging per-task finetunes of the multi-task DT improves it
    v, e = cmp(get(pipeline="p2", method="average"), pre)
    bests = []
    for name in ("lerp", "task_arithmetic", "ties", "dare_ta"):
        b = best_of_grid(rows, tasks, name)
        if b and pre:
            bests.append(f"{name} best {b[0].get('coefficients')}: {compare(b, pre)[1]}")
    out["C6"] = {"supported": v, "evidence": f"P2 average of the finetunes vs the multi-task DT before finetuning: "
                                             f"{e}. P3 grid bests (chosen on these episodes, so optimistic): "
                                             + ("; ".join(bests) or "not run") + "."}
    rule = f" Scores: mean D4RL-normalized score over tasks; decided when |difference| > max(2 s.e., {min_effect:g})."
    return {k: v | {"evidence": v["evidence"] + rule} for k, v in out.items()}


# ------------------------------------------------------------------------ table and figures

def labelled(rows: list[dict], tasks) -> list[tuple[str, list[dict]]]:
    """(label, one row per task) for every own-task model/method, in table order; P3 grids by their best."""
    out = []
    seen = []
    for r in rows:
        if r["pipeline"] == "p3" or not r.get("own_task", True):
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
            out.append((label, got))
    out.sort(key=lambda lg: _rank(lg[1][0]))
    for name in ("lerp", "task_arithmetic", "ties", "dare_ta"):
        b = best_of_grid(rows, tasks, name)
        if b:
            c = ", ".join(f"{k}={v:g}" for k, v in b[0]["coefficients"].items())
            out.append((f"P3 {name} best ({c})", b))
    return out


def _rank(r: dict) -> tuple:
    """Table order: random; per init set its unmerged DTs then its P1 merges; multi-task; P2."""
    pipe = ("baseline", "single", "p1", "multi", "p2").index(r["pipeline"])
    model = r["model"]
    sets = {f"dt_{s}": i for i, s in enumerate(SETS)}
    methods = ("average", "fisher", "average+finetune", "fisher+finetune")
    if r["pipeline"] in ("single", "p1"):
        sub = list(P1_SUBSETS.values()).index(r.get("subset") or "attn+mlp")
        return (1, sets.get(model, 9), pipe, methods.index(r["method"]) if r["method"] in methods else 0, sub)
    return (pipe, 0 if model == "mt" else 1, methods.index(r["method"]) if r["method"] in methods else 0)


def results_markdown(rows: list[dict], tasks, claim: dict, note: str = "") -> str:
    head = ["model / method"] + [f"{t}: return/target" for t in tasks] + [f"{t}: normalized" for t in tasks] + \
        ["mean normalized"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, got in labelled(rows, tasks):
        cells = [f"{r['return_over_target']:.3f} ± {r['return_over_target_std']:.3f}" for r in got]
        cells += [f"{r['normalized']:.1f} ± {r['normalized_std']:.1f}" for r in got]
        m, se = score(got)
        lines.append("| " + " | ".join([label] + cells + [f"{m:.1f} ± {se:.1f}"]) + " |")
    eps = sorted({r["episodes"] for r in rows})
    seeds = sorted({s for r in rows for s in r["seeds"]})
    lines.append("")
    lines.append(f"Mean ± std over {eps} episodes pooled over seeds {seeds}; the last column is the mean over "
                 "tasks ± its standard error. Normalized: D4RL's 100 (R - random) / (expert - random)." + note)
    lines += ["", "| claim | supported | evidence |", "|---|---|---|"]
    lines += [f"| {k} | {v['supported']} | {v['evidence']} |" for k, v in claim.items()]
    return "\n".join(lines)


def write_figures(rows: list[dict], tasks, workdir: str) -> list[str]:
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
    return paths


# ---------------------------------------------------------------------------------- the entry

def reproduce(config, workdir: str) -> str:
    """Run every stage of `config` under `workdir` (cached); write results.json / .md and figures;
    return the Markdown table."""
    import jax

    from mdt_jax.run import run_config_guard

    tasks, seeds = check_config(config)
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    # the claims' threshold and the compile cache change no stage: a run may be re-summarised with another
    run_config_guard(workdir, {k: v for k, v in _plain(config).items() if k not in ("claims_min_effect", "compile_cache")})
    if config.compile_cache and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(workdir), "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    data = {}
    for i, t in enumerate(tasks):
        path = os.path.join(workdir, "data", f"{t}-{config.data.quality}.hdf5")
        if not os.path.exists(path):
            _log(f"data {t}-{config.data.quality}")
            os.makedirs(os.path.dirname(path), exist_ok=True)
        data[t] = collect_dataset(t, config.data.quality, config.data.transitions, path,
                                  seed=config.data.seed + i, num_envs=config.data.num_envs)
    pretrained = pretrain(config, workdir, tasks)
    per_seed = []
    for s in seeds:
        _log(f"seed {s}")
        per_seed += _stage(os.path.join(workdir, f"seed_{s}"), "rows",
                           lambda: run_seed(config, workdir, tasks, data, s, pretrained))
    rows = pool_rows(per_seed)
    claim = claims(rows, tasks, config.claims_min_effect)
    from mdt_jax.data import load_d4rl_hdf5
    behaviour = {}
    for t in tasks:
        meta = load_d4rl_hdf5(data[t]).metadata
        behaviour[t] = {"return_mean": meta["return_mean"], "normalized": float(envs.normalized_score(t, meta["return_mean"])),
                        "quality": config.data.quality}
    note = " Dataset returns (behaviour): " + ", ".join(f"{t} {b['return_mean']:.1f} ({b['normalized']:.1f})"
                                                       for t, b in behaviour.items()) + "."
    table = results_markdown(rows, tasks, claim, note)
    write_json_atomic(os.path.join(workdir, "results.json"),
                      {"rows": rows, "claims": claim, "tasks": tasks, "seeds": seeds, "datasets": behaviour,
                       "per_seed_rows": per_seed, "config": _plain(config)})
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    figs = write_figures(rows, tasks, workdir)
    _log(f"done in {time.perf_counter() - t0:.0f} s: results.json, results.md, {', '.join(map(os.path.basename, figs))}")
    return table
