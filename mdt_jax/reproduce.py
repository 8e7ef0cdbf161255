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

from mdt_jax import checkpoint, envs, evaluate as ev
from mdt_jax.fileio import cached_json, write_json_atomic
from mdt_jax.pipelines import merge_stage
from mdt_jax.run import collect_dataset, config_dict, merge_spec, split_list, train_run_spec
from mdt_jax.training import train_run

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


def select_seeds(config, seed: int) -> int:
    """The reset seed of the selection episodes paired with study seed `seed` (config.eval.select_seeds)."""
    seeds = parse_seeds(config.seeds)
    sel = [int(x) for x in split_list(config.eval.get("select_seeds", ""))]
    return sel[seeds.index(seed)]


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
    seeds = parse_seeds(config.seeds)
    try:
        sel = [int(x) for x in split_list(config.eval.get("select_seeds", ""))]
    except ValueError:
        raise ValueError(f"config.eval.select_seeds: expected comma-separated ints, got "
                         f"{config.eval.select_seeds!r}") from None
    if not sel:
        raise ValueError("config.eval.select_seeds: empty; every 'best of' is chosen on selection episodes, "
                         "one reset seed per study seed")
    if len(sel) != len(seeds) or len(set(sel)) != len(sel) or min(sel) < 0:
        raise ValueError(f"config.eval.select_seeds: need {len(seeds)} distinct ints >= 0 (one per seed in "
                         f"config.seeds), got {config.eval.select_seeds!r}")
    if set(sel) & set(seeds):
        raise ValueError(f"config.eval.select_seeds: {sorted(set(sel) & set(seeds))} are also report seeds "
                         f"(config.seeds); selection and report episodes must be disjoint")
    from mdt_jax import report
    report.check_reps(config.get("bootstrap_reps", 2000))
    report.check_min_effect(config.claims_min_effect)
    if config.p1_finetune.num_steps < 0:
        raise ValueError(f"config.p1_finetune.num_steps: must be >= 0, got {config.p1_finetune.num_steps}")
    return tasks, parse_seeds(config.seeds)


# --------------------------------------------------------------------------------- the stages

def _train(config, workdir: str, *, task: str, dataset: str, seed: int, init_seed: int = -1, model=None,
           num_steps=None, init_from: str = "", train=None, init_trunk_from: str = "") -> str:
    """`training.train_run` of `config.train` (typed once) with these fields set; the model folder."""
    if os.path.exists(os.path.join(workdir, "model", checkpoint.META_FILE)):
        return os.path.join(workdir, "model")
    spec = train_run_spec(config.train, task=tuple(split_list(task)), dataset=tuple(split_list(dataset)), seed=seed,
                          init_seed=init_seed, init_from=init_from, init_trunk_from=init_trunk_from, model=model,
                          train=train, **({} if num_steps is None else {"num_steps": num_steps}))
    _log(f"train {os.path.basename(workdir)}")
    return train_run(spec, workdir)


def _fisher(config, workdir: str, model: str, dataset: str, seed: int, spec_info: bool = False) -> str:
    from mdt_jax.fisher import META_FILE, FisherRun, fisher_run

    if not os.path.exists(os.path.join(workdir, META_FILE)):
        _log(f"fisher {os.path.basename(workdir)}")
        fields = config_dict(config.fisher) | dict(checkpoint=model, dataset=(dataset,), seed=seed, spec_info=spec_info)
        fisher_run(FisherRun(**fields), workdir)
    return workdir


def _gram(config, workdir: str, model: str, dataset: str, seed: int) -> str:
    """RegMean's input Grams of a model on its own data (the Fisher's batch settings)."""
    from mdt_jax.regmean import GramRun, gram_run

    if not os.path.exists(os.path.join(workdir, "grams.json")):
        _log(f"gram {os.path.basename(workdir)}")
        gram_run(GramRun(checkpoint=model, dataset=(dataset,), seed=seed, num_batches=config.fisher.num_batches,
                         batch_size=config.fisher.batch_size), workdir)
    return workdir


def _search(config, workdir: str, mt: str, fts: list[str], seed: int, select_seed: int) -> list[dict]:
    """launch.search (configs/search.py) with `config.search` over it: the best candidate's rows."""
    from configs import search as search_cfg
    from mdt_jax.search import search_from_config

    path = os.path.join(workdir, "search.json")
    if not os.path.exists(path):
        _log(f"search {os.path.basename(workdir)}")
        c = search_cfg.get_config()
        c.method, c.base, c.checkpoints, c.seed = "lerp", mt, ",".join(fts), seed
        c.selection_seed, c.report_seed = str(select_seed), str(seed)
        for k, v in config_dict(config.search).items():
            if k == "episodes":
                c.eval.episodes = v
            else:
                c[k] = v
        c.eval.report_episodes, c.eval.max_steps = config.eval.episodes, config.eval.max_steps
        c.eval.executor = config.eval.executor
        search_from_config(c, workdir)
    with open(path) as f:
        rows = json.load(f)["rows"]
    # the chosen coefficients differ per seed: keep them aside so the seeds' rows pool
    return [r | {"coefficients": None, "selected_coefficients": r["coefficients"]} for r in rows
            if r["model"].startswith("search_")]


def _merge(config, workdir: str, seed: int, **fields) -> list[dict]:
    """`pipelines.merge_stage` of `config.merge` (typed once) with `fields` over it; its rows (cached
    in merge.json)."""
    path = os.path.join(workdir, "merge.json")
    if not os.path.exists(path):
        _log(f"merge {os.path.basename(workdir)}")
        spec = merge_spec(config.merge, seed=seed, eval=_own_task_eval(config), **fields)
        merge_stage(spec, workdir)
    with open(path) as f:
        return json.load(f)["rows"]


def _own_task_eval(config) -> ev.EvalSpec:
    """The study's evaluation settings (`config.eval`): single-task models on their own task only."""
    return ev.EvalSpec(episodes=config.eval.episodes, max_steps=config.eval.max_steps,
                       executor=config.eval.executor, own_task=True)


def random_policy_rows(tasks, *, episodes: int, max_steps: int, seed: int) -> list[dict]:
    """A uniform-random policy (the 'random' data's policy) from the evaluator's episode starts."""
    from mdt_jax import evaluate as ev
    from mdt_jax.behaviour.collect import uniform_policy
    from mdt_jax.behaviour.reference import rollout_returns

    rows = []
    for name in tasks:
        task = envs.get_task(name)
        ret, length = rollout_returns(name, uniform_policy(task.act_dim), episodes, seed, rng_stream=1,
                                      max_steps=max_steps)
        res = ev.TaskResult(name, ret[None], length[None], np.zeros((1, episodes), np.int64), task.target_return)
        rows.append(res.summary())
    return rows


def _tag(rows: list[dict], seed: int, **fields) -> list[dict]:
    # every model a study evaluates is its training run's last checkpoint (the configs' save_mode)
    return [{"checkpoint_mode": "last"} | r | fields | {"seed": seed} for r in rows]


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
                               model=config_dict(config.large) if name == "large" else None,
                               init_trunk_from=pretrained if name == "pretrained" else "")
                        for i, t in enumerate(tasks)]
    for name in sets:
        fishers = [_fisher(config, os.path.join(sdir, f"fisher_{name}_{t}"), m, data[t], seed)
                   for t, m in zip(tasks, models[name])]
        variants = [("average", "attn,mlp"), ("fisher", "attn,mlp")] + ([("average", "blocks")] if name == "common"
                                                                          else [])
        for k, (method, subset) in enumerate(variants):
            out = _merge(config, os.path.join(sdir, f"p1_{name}_{method}_{subset.replace(',', '+')}"), seed,
                         pipeline="p1", method=method, subset=subset, checkpoints=tuple(models[name]),
                         fishers=tuple(fishers), eval_inputs=k == 0)
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
    # beyond the paper: RegMean of the P1 attn+mlp (each model's Grams on its own data)
    for name in [n for n in ("common", "independent") if n in sets]:
        grams = [_gram(config, os.path.join(sdir, f"gram_{name}_{t}"), m, data[t], seed)
                 for t, m in zip(tasks, models[name])]
        for r in _merge(config, os.path.join(sdir, f"p1_{name}_regmean_attn+mlp"), seed, pipeline="p1",
                        method="regmean", subset="attn,mlp", checkpoints=tuple(models[name]),
                        grams=tuple(grams), eval_inputs=False):
            rows += _tag([r], seed, pipeline="beyond", model=f"dt_{name}", method="regmean", subset="attn+mlp")
    # beyond the paper: the independent inits permutation-aligned (weight matching) before averaging
    if "independent" in sets:
        for r in _merge(config, os.path.join(sdir, "p1_independent_aligned_average_attn+mlp"), seed, pipeline="p1",
                        method="average", subset="attn,mlp", checkpoints=tuple(models["independent"]),
                        align=True, eval_inputs=False):
            rows += _tag([r], seed, pipeline="beyond", model="dt_independent", method="aligned_average",
                         subset="attn+mlp")
    # the multi-task DT, its finetunes, P2 and P3
    mt = _train(config, os.path.join(sdir, "mt"), task=",".join(tasks), dataset=",".join(data[t] for t in tasks),
                seed=100 * seed + 90, model=config_dict(config.multi.model), num_steps=config.multi.num_steps,
                train={"batch_size": config.multi.batch_size})
    from mdt_jax.pipelines import P2_FINETUNE
    ft_train = {k: ",".join(v) if isinstance(v, tuple) else v for k, v in P2_FINETUNE.items()} \
        | config_dict(config.multi.finetune_train)
    fts = [_train(config, os.path.join(sdir, f"ft_{t}"), task=t, dataset=data[t], seed=100 * seed + 91 + i,
                  init_from=mt, num_steps=config.multi.finetune_steps, train=ft_train)
           for i, t in enumerate(tasks)]
    ft_fishers = [_fisher(config, os.path.join(sdir, f"fisher_ft_{t}"), m, data[t], seed, spec_info=True)
                  for t, m in zip(tasks, fts)]
    select_seed = select_seeds(config, seed)
    p3_rows = _merge(config, os.path.join(sdir, "p3"), seed, pipeline="p3", method="average", base=mt,
                     checkpoints=tuple(fts), eval_inputs=True, select_seed=select_seed)
    with open(os.path.join(sdir, "p3", "merge.json")) as f:
        p3_best = json.load(f)["merge"].get("p3_best", {})
    for name, b in p3_best.items():  # each grid's best, chosen on the selection episodes, reported on these
        rows += _tag([r | {"coefficients": None, "selected_coefficients": b["coefficients"],
                           "selection": {"chosen_on_seed": b["chosen_on_seed"], "reported_on_seed": b["reported_on_seed"]}}
                      for r in p3_rows if r["model"] == f"p3_{name}" and r["coefficients"] == b["coefficients"]],
                     seed, pipeline="p3_best", model="mt_finetunes", method=name)
    for r in p3_rows:
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
                    checkpoints=tuple(fts), fishers=tuple(ft_fishers), eval_inputs=False):
        rows += _tag([r], seed, pipeline="p2", model="mt_finetunes", method="fisher")
    # beyond the paper: EMR (a unified task vector, a mask and a rescaler per task) on the P2 finetunes
    for r in _merge(config, os.path.join(sdir, "p2_emr"), seed, pipeline="p2", method="emr", base=mt,
                    checkpoints=tuple(fts), eval_inputs=False):
        rows += _tag([r], seed, pipeline="beyond", model="mt_finetunes", method="emr")
    # beyond the paper: per-block lerp coefficients between the multi-task DT and the P2 average, by
    # CMA-ES on closed-loop return (selection episodes), the best reported on the report episodes
    sc = config.get("search", None)
    if sc is not None and sc.generations:
        rows += _tag(_search(config, os.path.join(sdir, "search_lerp"), mt, fts, seed, select_seed), seed,
                     pipeline="beyond", model="mt_finetunes", method="cma_lerp")
    rows += _tag(cached_json(os.path.join(sdir, "stages", "random.json"), lambda: random_policy_rows(
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
    m = checkpoint.load(model)
    out = cached_json(os.path.join(wd, "stages", "eval.json"), lambda: [
        r.to_dict() for r in ev.evaluate_model(m, m.params, _own_task_eval(config), seed=seed, label="dt_common")])
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
    lines += ["", "| claim | supported | difference [95% CI] | P(improvement) [95% CI] | evidence |",
              "|---|---|---|---|---|"]
    for k, v in claim.items():
        d = f"{v['difference']:+.2f} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]" if "ci" in v else "-"
        p = f"{v['probability_of_improvement']:.2f} [{v['poi_ci'][0]:.2f}, {v['poi_ci'][1]:.2f}]" if "ci" in v else "-"
        lines.append(f"| {k} | {v['supported']} | {d} | {p} | {v['evidence']} |")
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
    run_config_guard(workdir, {k: v for k, v in config_dict(config).items() if k not in ("claims_min_effect", "compile_cache")})
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
        per_seed += cached_json(os.path.join(workdir, f"seed_{s}", "stages", "rows.json"),
                           lambda: run_seed(config, workdir, tasks, data, s, pretrained))
    rows = pool_rows(per_seed)
    BOOTSTRAP["reps"] = int(config.get("bootstrap_reps", 2000))
    claim = claims(rows, tasks, config.claims_min_effect)
    estimates = interval_table(rows, tasks)
    from mdt_jax.data import load_d4rl_hdf5
    behaviour = {}
    for t in tasks:
        meta = load_d4rl_hdf5(data[t]).metadata
        behaviour[t] = {"return_mean": meta["return_mean"], "normalized": float(envs.normalized_score(t, meta["return_mean"])),
                        "quality": config.data.quality}
    note = " Dataset returns (behaviour): " + ", ".join(f"{t} {b['return_mean']:.1f} ({b['normalized']:.1f})"
                                                       for t, b in behaviour.items()) + "."
    table = results_markdown(rows, tasks, claim, note, estimates)
    write_json_atomic(os.path.join(workdir, "results.json"),
                      {"rows": rows, "claims": claim, "estimates": estimates, "tasks": tasks, "seeds": seeds,
                       "selection": {"report_seeds": seeds,
                                     "select_seeds": [select_seeds(config, x) for x in seeds],
                                     "rule": "P3 bests are chosen per seed on the selection episodes (reset "
                                             "seed select_seeds[i]) and reported on the report episodes "
                                             "(reset seed seeds[i])"},
                       "datasets": behaviour,
                       "per_seed_rows": per_seed, "config": config_dict(config)})
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    figs = write_figures(rows, tasks, workdir, estimates)
    _log(f"done in {time.perf_counter() - t0:.0f} s: results.json, results.md, {', '.join(map(os.path.basename, figs))}")
    return table
