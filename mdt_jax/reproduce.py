"""The main job: the paper's whole study on one config, every stage cached (configs/quickstart.py,
configs/paper.py).

    python -m launch.reproduce --config=configs/quickstart.py --workdir=runs/quickstart

Stages, each kept under WORKDIR and skipped when the same command runs again (a killed stage
resumes: training from its last checkpoint, merges from their cached evaluations):

1. data: `run.collect_dataset` per task, quality `config.data.quality` -> data/<task>-<quality>.hdf5
   (and the pretraining data and pretrain/mt, the embedded pre-trained common init)
1b. grouped training (`train_groups`, `config.group`): before the per-seed loop, same-shaped models
   of every seed are trained in one vmapped program each (`training.train_group`): the single-task
   sets of every seed and task (independent, common and pretrained: one shape, the tasks padded
   to the widest state and action; large: another), the multi-task DTs across seeds, then their
   finetunes across seeds and tasks. Each member keeps the workdir, seed and init seed it has
   when trained alone (stage 2 then finds its model/), and ends as the run alone would to float
   tolerance. A group's stacked state is checkpointed once per save in groups/<kind>_<k>_<c>/, so
   a kill resumes it bit for bit. `config.group.mode`: "auto" groups every shape on GPU/TPU and,
   on CPU, only shapes of hidden_size <= 32 (`GROUP_CPU_MAX_HIDDEN`: measured with
   benchmarks/study.py on a 2-core CPU, vmap over 6 models is 1.05-1.13x faster per model at H32,
   0.95-1.09x at H64, and slower at H128; docs/benchmarks.md); "on" groups every shape; "off" trains every model alone in stage 2, as before
   grouping existed. `max_models` splits a group into programs of at most that many models (in
   order: seed, set, task), `max_bytes` is the memory a group must fit, estimated from its
   shapes with jax.eval_shape before anything is allocated (0: a fraction of the device's
   memory; a group over it stops the study with a clear error, before any results.json). A
   group of one model trains alone. The P1 finetunes need their seed's merges, so each seed's
   (every method and task) form one group inside stage 2 (groups/p1ft_<seed>_<k>_<c>/).
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
   figures (results_bars.png, results_lerp.png): the report, `mdt_jax.results`.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np

from mdt_jax import checkpoint, envs, evaluate as ev
from mdt_jax.fileio import JSON, Store, cached_json, write_file_atomic, write_json_atomic
from mdt_jax.pipelines import cached_eval, merge_stage_steps
from mdt_jax.results import (BOOTSTRAP, P1_SUBSETS, SETS, claims, interval_table, pool_rows,  # noqa: F401
                             results_markdown, write_figures)
from mdt_jax.run import collect_dataset, config_dict, merge_spec, split_list, train_run_spec
from mdt_jax.training import TrainRun, train_run



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
    check_group(config)
    return tasks, parse_seeds(config.seeds)


def check_group(config) -> None:
    """`config.group` (optional: absent means "off"): mode, max_models, max_bytes."""
    g = config.get("group", None)
    if g is None:
        return
    unknown = sorted(set(config_dict(g)) - {"mode", "max_models", "max_bytes"})
    if unknown:
        raise ValueError(f"config.group: unknown fields {unknown}; known: mode, max_models, max_bytes")
    if g.get("mode") not in GROUP_MODES:
        raise ValueError(f"config.group.mode: must be one of {GROUP_MODES}, got {g.get('mode')!r}")
    for f in ("max_models", "max_bytes"):
        v = g.get(f, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            zero = "no cap" if f == "max_models" else "a fraction of the device memory"
            raise ValueError(f"config.group.{f}: must be an int >= 0 (0: {zero}), got {v!r}")
    if g.get("max_models", 0) == 1:
        raise ValueError("config.group.max_models: 1 would group nothing; use config.group.mode='off'")


# --------------------------------------------------------------------------------- the stages

def _spec(config, *, task: str, dataset: str, seed: int, init_seed: int = -1, model=None, num_steps=None,
          init_from: str = "", train=None, init_trunk_from: str = "") -> TrainRun:
    """`config.train` typed (a `training.TrainRun`) with these fields set."""
    return train_run_spec(config.train, task=tuple(split_list(task)), dataset=tuple(split_list(dataset)), seed=seed,
                          init_seed=init_seed, init_from=init_from, init_trunk_from=init_trunk_from, model=model,
                          train=train, **({} if num_steps is None else {"num_steps": num_steps}))


def _train(config, workdir: str, **fields) -> str:
    """`training.train_run` of `_spec(config, **fields)`; the model folder."""
    if os.path.exists(os.path.join(workdir, "model", checkpoint.META_FILE)):
        return os.path.join(workdir, "model")
    spec = _spec(config, **fields)
    _log(f"train {os.path.basename(workdir)}")
    return train_run(spec, workdir)


def _sets(config, pretrained: str) -> list[str]:
    return [s for s in SETS if (s != "large" or len(config.large)) and (s != "pretrained" or pretrained)]


def _single_runs(config, sdir: str, tasks: list[str], data: dict, seed: int, pretrained: str) -> dict:
    """{set: [(workdir, `_train` fields)]}: a seed's single-task DTs (module doc, stage 2)."""
    out = {}
    for name in _sets(config, pretrained):
        common_init = name != "independent"
        out[name] = [(os.path.join(sdir, f"dt_{name}_{t}"),
                      dict(task=t, dataset=data[t], seed=100 * seed + i,
                           init_seed=100 * seed + (50 if common_init else 10 + i),
                           model=config_dict(config.large) if name == "large" else None,
                           init_trunk_from=pretrained if name == "pretrained" else ""))
                     for i, t in enumerate(tasks)]
    return out


def _mt_run(config, sdir: str, tasks: list[str], data: dict, seed: int) -> tuple[str, dict]:
    """(workdir, `_train` fields) of a seed's multi-task DT."""
    return os.path.join(sdir, "mt"), dict(task=",".join(tasks), dataset=",".join(data[t] for t in tasks),
                                          seed=100 * seed + 90, model=config_dict(config.multi.model),
                                          num_steps=config.multi.num_steps,
                                          train={"batch_size": config.multi.batch_size})


def _ft_runs(config, sdir: str, tasks: list[str], data: dict, seed: int, mt: str) -> list[tuple[str, dict]]:
    """[(workdir, `_train` fields)] of a seed's per-task finetunes of its multi-task DT `mt`."""
    from mdt_jax.pipelines import P2_FINETUNE
    ft_train = {k: ",".join(v) if isinstance(v, tuple) else v for k, v in P2_FINETUNE.items()} \
        | config_dict(config.multi.finetune_train)
    return [(os.path.join(sdir, f"ft_{t}"), dict(task=t, dataset=data[t], seed=100 * seed + 91 + i, init_from=mt,
                                                 num_steps=config.multi.finetune_steps, train=ft_train))
            for i, t in enumerate(tasks)]


# ------------------------------------------------------------------------- grouped training

GROUP_MODES = ("auto", "on", "off")
GROUP_CPU_MAX_HIDDEN = 32  # "auto" on CPU groups only shapes this narrow (module doc, config.group)


def _group_mode(config) -> str:
    g = config.get("group", None)
    return "off" if g is None else g.mode


def _groupable(config, hidden_size: int) -> bool:
    """Whether `config.group.mode` trains a shape of this width grouped here."""
    import jax

    mode = _group_mode(config)
    return mode == "on" or (mode == "auto" and (jax.default_backend() != "cpu" or hidden_size <= GROUP_CPU_MAX_HIDDEN))


def _hidden_size(spec: TrainRun) -> int:
    if spec.init_from:
        return checkpoint.read_meta(spec.init_from)[0].hidden_size
    from mdt_jax.models.dt import DTConfig
    return int(spec.model.get("hidden_size", DTConfig.hidden_size))


def _train_grouped(config, workdir: str, name: str, runs: list[tuple[str, dict]]) -> None:
    """Train `runs` [(workdir, `_train` fields)] in groups of one shape (`training.train_group`):
    runs that share every field but `training.GROUP_FREE` form a group, in order of appearance,
    split into chunks of `config.group.max_models` (0: no cap); a chunk of one, or a shape
    `_groupable` refuses, is left to `run_seed` (trained alone). Group k's chunk c lives in
    WORKDIR/groups/<name>_<k>_<c>/."""
    from mdt_jax.training import GROUP_FREE, train_group

    shapes: dict[str, list[tuple[str, TrainRun]]] = {}
    for wd, fields in runs:
        spec = _spec(config, **fields)
        key = json.dumps({k: v for k, v in spec.run_config().items() if k not in GROUP_FREE}, sort_keys=True,
                         default=str)
        shapes.setdefault(key, []).append((wd, spec))
    cap = int(config.group.max_models)
    for k, members in enumerate(shapes.values()):
        if not _groupable(config, _hidden_size(members[0][1])):
            continue
        size = cap or len(members)
        for c in range(0, len(members), size):
            chunk = members[c:c + size]
            if len(chunk) < 2 or all(os.path.exists(os.path.join(wd, "model", checkpoint.META_FILE))
                                     for wd, _ in chunk):
                continue
            gname = f"{name}_{k}_{c // size}"
            _log(f"train group {gname} ({len(chunk)} models)")
            train_group([s for _, s in chunk], [wd for wd, _ in chunk],
                        group_dir=os.path.join(workdir, "groups", gname), max_bytes=int(config.group.max_bytes) or None)


def train_groups(config, workdir: str, tasks: list[str], data: dict[str, str], seeds: list[int],
                 pretrained: str = "") -> None:
    """Before the per-seed stages: every seed's single-task DTs (each shape one group: the
    independent, common and pretrained sets together, the large set apart), the multi-task DTs
    across seeds, then their finetunes across seeds and tasks, grouped as `config.group` says
    (`_train_grouped`); `run_seed` then finds these models trained. Nothing with mode "off"."""
    if _group_mode(config) == "off":
        return
    sdir = lambda s: os.path.join(workdir, f"seed_{s}")
    _train_grouped(config, workdir, "dt", [r for s in seeds for runs in _single_runs(
        config, sdir(s), tasks, data, s, pretrained).values() for r in runs])
    mts = [_mt_run(config, sdir(s), tasks, data, s) for s in seeds]
    _train_grouped(config, workdir, "mt", mts)
    if not _groupable(config, int(config_dict(config.multi.model).get("hidden_size", config.train.model.hidden_size))):
        return
    # the finetunes start from their seed's multi-task DT: those not grouped are trained here first
    fts = [r for (wd, fields), s in zip(mts, seeds)
           for r in _ft_runs(config, sdir(s), tasks, data, s, _train(config, wd, **fields))]
    _train_grouped(config, workdir, "ft", fts)


def _fishers(config, workdirs: list[str], models: list[str], datasets: list[str], seed: int,
             spec_info: bool = False) -> list[str]:
    """The Fishers of a set's models, each on its own data, in one grouped call (`fisher_group_run`;
    members already written are skipped); their folders. With `config.group.mode` "off", each alone
    (`fisher_run`, chunked as `FisherRun` says), as the study ran before grouping."""
    from mdt_jax.fisher_stage import META_FILE, FisherRun, fisher_group_run, fisher_run

    fields = config_dict(config.fisher) | dict(seed=seed, spec_info=spec_info)
    runs = [FisherRun(**(fields | dict(checkpoint=m, dataset=(d,)))) for m, d in zip(models, datasets)]
    todo = [(r, w) for r, w in zip(runs, workdirs) if not os.path.exists(os.path.join(w, META_FILE))]
    for _, w in todo:
        _log(f"fisher {os.path.basename(w)}")
    if _group_mode(config) == "off":
        for r, w in todo:
            fisher_run(r, w)
    else:
        fisher_group_run(runs, workdirs)
    return list(workdirs)


def _gram(config, workdir: str, model: str, dataset: str, seed: int) -> str:
    """RegMean's input Grams of a model on its own data (the Fisher's batch settings)."""
    from mdt_jax.regmean import GramRun, gram_run

    if not os.path.exists(os.path.join(workdir, "grams.json")):
        _log(f"gram {os.path.basename(workdir)}")
        gram_run(GramRun(checkpoint=model, dataset=(dataset,), seed=seed, num_batches=config.fisher.num_batches,
                         batch_size=config.fisher.batch_size), workdir)
    return workdir


def _search(config, workdir: str, mt: str, fts: list[str], seed: int, select_seed: int) -> list[dict]:
    """`search.search_run` (configs/search.py's defaults) with `config.search` over it: the best
    candidate's rows."""
    from mdt_jax.search import SearchEval, SearchSpec, search_run

    path = os.path.join(workdir, "search.json")
    if not os.path.exists(path):
        _log(f"search {os.path.basename(workdir)}")
        over = config_dict(config.search)
        ev_fields = {"episodes": over.pop("episodes")} if "episodes" in over else {}
        fields = {"method": "lerp", "base": mt, "checkpoints": tuple(fts), "seed": seed,
                  "selection_seed": str(select_seed), "report_seed": str(seed)} | over
        search_run(SearchSpec(**fields, eval=SearchEval(report_episodes=config.eval.episodes,
                                                        max_steps=config.eval.max_steps,
                                                        executor=config.eval.executor, **ev_fields)), workdir)
    with open(path) as f:
        rows = json.load(f)["rows"]
    # the chosen coefficients differ per seed: keep them aside so the seeds' rows pool
    return [r | {"coefficients": None, "selected_coefficients": r["coefficients"]} for r in rows
            if r["model"].startswith("search_")]


def _merge(config, workdir: str, seed: int, **fields):
    """`pipelines.merge_stage` of `config.merge` (typed once) with `fields` over it, as a generator
    of its evaluation requests (`merge_stage_steps`); returns its rows (cached in merge.json)."""
    path = os.path.join(workdir, "merge.json")
    if not os.path.exists(path):
        _log(f"merge {os.path.basename(workdir)}")
        spec = merge_spec(config.merge, seed=seed, eval=_own_task_eval(config), **fields)
        yield from merge_stage_steps(spec, workdir)
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
    return ev.run_lockstep([seed_stages(config, workdir, tasks, data, seed, pretrained)])[0]


def seed_stages(config, workdir: str, tasks: list[str], data: dict[str, str], seed: int, pretrained: str = ""):
    """`run_seed` as a generator of its evaluation requests (`evaluate.run_lockstep`), so that
    several seeds' stages run side by side with their evaluations batched; returns the rows."""
    sdir = os.path.join(workdir, f"seed_{seed}")
    rows: list[dict] = []
    singles = _single_runs(config, sdir, tasks, data, seed, pretrained)
    sets = list(singles)
    models: dict[str, list[str]] = {name: [_train(config, wd, **fields) for wd, fields in runs]
                                    for name, runs in singles.items()}
    for name in sets:
        fishers = _fishers(config, [os.path.join(sdir, f"fisher_{name}_{t}") for t in tasks], models[name],
                           [data[t] for t in tasks], seed)
        variants = [("average", "attn,mlp"), ("fisher", "attn,mlp")] + ([("average", "blocks")] if name == "common"
                                                                          else [])
        merged = []
        for k, (method, subset) in enumerate(variants):
            merged.append((yield from _merge(
                config, os.path.join(sdir, f"p1_{name}_{method}_{subset.replace(',', '+')}"), seed, pipeline="p1",
                method=method, subset=subset, checkpoints=tuple(models[name]), fishers=tuple(fishers),
                eval_inputs=k == 0)))
        finetune = name == "common" and config.p1_finetune.num_steps
        if finetune:  # the seed's P1 finetunes (every method and task) as one group
            _train_grouped(config, workdir, f"p1ft_{seed}", [
                _p1_finetune_run(config, sdir, r, method, data, seed)
                for (method, subset), out in zip(variants, merged) if subset == "attn,mlp"
                for r in out if not _unmerged(r)])
        for (method, subset), out in zip(variants, merged):
            for r in out:  # own_task evaluation: each merged (or unmerged) model on its own task
                assert _unmerged(r) or r["model"] == f"p1_{method}[{r['task']}]", (r["model"], r["task"])
                if _unmerged(r):
                    rows += _tag([r], seed, pipeline="single", model=f"dt_{name}", method="unmerged")
                else:
                    rows += _tag([r], seed, pipeline="p1", model=f"dt_{name}", method=method,
                                 subset=P1_SUBSETS[subset])
                    if finetune and subset == "attn,mlp":
                        rows += yield from _p1_finetune(config, sdir, r, method, data, seed)
    # beyond the paper: RegMean of the P1 attn+mlp (each model's Grams on its own data)
    for name in [n for n in ("common", "independent") if n in sets]:
        grams = [_gram(config, os.path.join(sdir, f"gram_{name}_{t}"), m, data[t], seed)
                 for t, m in zip(tasks, models[name])]
        for r in (yield from _merge(config, os.path.join(sdir, f"p1_{name}_regmean_attn+mlp"), seed, pipeline="p1",
                                    method="regmean", subset="attn,mlp", checkpoints=tuple(models[name]),
                                    grams=tuple(grams), eval_inputs=False)):
            rows += _tag([r], seed, pipeline="beyond", model=f"dt_{name}", method="regmean", subset="attn+mlp")
    # beyond the paper: the independent inits permutation-aligned (weight matching) before averaging
    if "independent" in sets:
        for r in (yield from _merge(config, os.path.join(sdir, "p1_independent_aligned_average_attn+mlp"), seed,
                                    pipeline="p1", method="average", subset="attn,mlp",
                                    checkpoints=tuple(models["independent"]), align=True, eval_inputs=False)):
            rows += _tag([r], seed, pipeline="beyond", model="dt_independent", method="aligned_average",
                         subset="attn+mlp")
    # the multi-task DT, its finetunes, P2 and P3
    mt_wd, mt_fields = _mt_run(config, sdir, tasks, data, seed)
    mt = _train(config, mt_wd, **mt_fields)
    fts = [_train(config, wd, **fields) for wd, fields in _ft_runs(config, sdir, tasks, data, seed, mt)]
    ft_fishers = _fishers(config, [os.path.join(sdir, f"fisher_ft_{t}") for t in tasks], fts, [data[t] for t in tasks],
                          seed, spec_info=True)
    select_seed = select_seeds(config, seed)
    p3_rows = yield from _merge(config, os.path.join(sdir, "p3"), seed, pipeline="p3", method="average", base=mt,
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
    for r in (yield from _merge(config, os.path.join(sdir, "p2_fisher"), seed, pipeline="p2", method="fisher",
                                checkpoints=tuple(fts), fishers=tuple(ft_fishers), eval_inputs=False)):
        rows += _tag([r], seed, pipeline="p2", model="mt_finetunes", method="fisher")
    # beyond the paper: EMR (a unified task vector, a mask and a rescaler per task) on the P2 finetunes
    for r in (yield from _merge(config, os.path.join(sdir, "p2_emr"), seed, pipeline="p2", method="emr", base=mt,
                                checkpoints=tuple(fts), eval_inputs=False)):
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


def seed_rows(config, workdir: str, tasks: list[str], data: dict[str, str], seeds: list[int],
              pretrained: str = "", together: bool | None = None) -> list[dict]:
    """Every seed's rows, in seed order, each seed's cached in WORKDIR/seed_<s>/stages/rows.json.

    With grouping on (`config.group.mode` not "off"), the seeds not yet done run side by side
    (`seed_stages` under `evaluate.run_lockstep`): each seed's stages in order, the same stage of
    every seed evaluated in one call per compatible group. On the native executor that changes no
    result (a candidate's rows are bitwise those it gets alone), so a resumed study, however its
    seeds were interrupted, ends as an uninterrupted one. With grouping off, one seed after the
    other, each alone. `together` overrides that choice."""
    stores = {s: Store(os.path.join(workdir, f"seed_{s}", "stages"), JSON, what="cached stage") for s in seeds}
    todo = [s for s in seeds if "rows" not in stores[s]]
    together = (_group_mode(config) != "off" if together is None else together) and len(todo) > 1
    for group in ([todo] if together else [[s] for s in todo]):
        _log(f"seed{'s' * (len(group) > 1)} {', '.join(map(str, group))}")
        ev.run_lockstep([seed_stages(config, workdir, tasks, data, s, pretrained) for s in group],
                        on_done=lambda i, rows: stores[group[i]].put("rows", rows))
    return [r for s in seeds for r in stores[s].get("rows")]


def _unmerged(row: dict) -> bool:
    """Whether a P1 stage's row is an input model (evaluated on its own task), not a merge."""
    return row["model"] == f"unmerged[{row['task']}]"


def _p1_finetune_run(config, sdir: str, row: dict, method: str, data: dict, seed: int) -> tuple[str, dict]:
    """(workdir, `_train` fields) of the paper's P1 second step for one merged row: the merged
    attn+mlp frozen, the rest finetuned on the row's task."""
    from mdt_jax.pipelines import P1_FREEZE

    t = row["task"]
    return os.path.join(sdir, f"p1ft_{method}_{t}"), dict(
        task=t, dataset=data[t], seed=100 * seed + 70, init_from=row["checkpoint"],
        num_steps=config.p1_finetune.num_steps, train={"freeze": ",".join(P1_FREEZE)})


def _p1_finetune(config, sdir: str, row: dict, method: str, data: dict, seed: int):
    """The P1 finetune of `row` (trained here unless its group trained it), evaluated on its task
    (a generator of that request); returns its rows."""
    wd, fields = _p1_finetune_run(config, sdir, row, method, data, seed)

    def request():
        m = checkpoint.load(_train(config, wd, **fields))
        return ev.EvalRequest(m, m.params, _own_task_eval(config), seed, "dt_common")

    out = yield from cached_eval(os.path.join(wd, "stages"), "eval", request)
    return _tag(out, seed, pipeline="p1", model="dt_common", method=f"{method}+finetune", subset="attn+mlp")


# ---------------------------------------------------------------------------------- the entry

def reproduce(config, workdir: str, seeds_together: bool | None = None) -> str:
    """Run every stage of `config` under `workdir` (cached); write results.json / .md and figures;
    return the Markdown table. `seeds_together` overrides whether the seeds' stages run side by
    side with their evaluations batched (`seed_rows`; it changes no result, only the time)."""
    import jax

    from mdt_jax.fileio import run_config_guard

    tasks, seeds = check_config(config)
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    # the claims' threshold, the compile cache and the group memory budget change no stage: a run
    # may be re-summarised with another; grouping off is recorded as no field (studies before it)
    guarded = {k: v for k, v in config_dict(config).items() if k not in ("claims_min_effect", "compile_cache")}
    if _group_mode(config) == "off":
        guarded.pop("group", None)
    else:
        guarded["group"] = {k: v for k, v in config_dict(config.group).items() if k != "max_bytes"}
    run_config_guard(workdir, guarded)
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
    train_groups(config, workdir, tasks, data, seeds, pretrained)
    per_seed = seed_rows(config, workdir, tasks, data, seeds, pretrained, together=seeds_together)
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
    write_file_atomic(os.path.join(workdir, "results.md"), lambda tmp: pathlib.Path(tmp).write_text(table + "\n"),
                      overwrite=True)
    figs = write_figures(rows, tasks, workdir, estimates)
    _log(f"done in {time.perf_counter() - t0:.0f} s: results.json, results.md, {', '.join(map(os.path.basename, figs))}")
    return table
