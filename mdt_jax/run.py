"""Glue from ml_collections configs to library calls (used by the absl launchers and notebooks)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import checkpoint, sharding
from mdt_jax.behaviour.datasets import (POLICIES_DIR, QUALITIES, behaviour_policy_dir,  # noqa: F401
                                       collect_dataset, resolve_dataset)
from mdt_jax.fileio import write_json_atomic
from mdt_jax.models.dt import DTConfig
from mdt_jax.train import TrainConfig, default_sampler, fit, init_params_for_seed, run_config_guard


def _plain(c) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def model_config(model_cfg, state_dim: int, act_dim: int, tasks=()) -> DTConfig:
    fields = _plain(model_cfg)
    if tasks:
        return DTConfig.multi_task(tasks, **fields)
    return DTConfig(state_dim=state_dim, act_dim=act_dim, **fields)


def train_config(train_cfg) -> TrainConfig:
    return TrainConfig(**_plain(train_cfg))


def task_dims(task: str) -> tuple[int, int]:
    from mdt_jax.envs import get_task
    t = get_task(task)
    return t.obs_dim, t.act_dim


def split_list(value) -> list[str]:
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def _load_task_data(task: str, dataset: str, cfg_k: int, max_ep_len: int, rtg_scale: float):
    from mdt_jax.data import load_dataset, segment_data

    state_dim, act_dim = task_dims(task)
    ds = load_dataset(resolve_dataset(dataset))
    got = (ds.observations.shape[1], ds.actions.shape[1])
    if got != (state_dim, act_dim):
        raise ValueError(f"config.dataset: {dataset} has (state_dim, act_dim) = {got}, but task "
                         f"{task!r} needs {(state_dim, act_dim)}")
    return segment_data(ds, context_len=cfg_k, max_ep_len=max_ep_len, rtg_scale=rtg_scale)


def _stats_meta(data) -> dict:
    return {"state_mean": np.asarray(data.state_mean).tolist(), "state_std": np.asarray(data.state_std).tolist()}


def train_from_config(config, workdir: str) -> str:
    """Train a DT as `config` (configs/train.py) says; returns the model folder.

    - one task and dataset: a single-task DT;
    - comma-separated tasks and datasets (same order): one multi-task DT (shared trunk, per-task
      heads, `batch_size` samples per task, losses summed over tasks);
    - one task with `init_from` a multi-task checkpoint: that model finetuned on the task (its
      normalisation comes from the checkpoint).

    With `init_from`, the model config is the checkpoint's and `config.model` is not used.

    Resumes from `workdir/checkpoints` when run again with the same config; refuses a workdir that
    holds a different run.
    """
    from mdt_jax.data import pad_to, sample_batch, stack_segment_data

    tasks, datasets = split_list(config.task), split_list(config.dataset)
    if not datasets:
        raise ValueError("config.dataset: no dataset given (a .hdf5/.pkl path or minari:<id>)")
    if len(tasks) != len(datasets):
        raise ValueError(f"config.task / config.dataset: {len(tasks)} task(s) but {len(datasets)} dataset(s)")
    for t in tasks:
        task_dims(t)
    if not (isinstance(config.rtg_scale, (int, float)) and config.rtg_scale > 0):
        raise ValueError(f"config.rtg_scale: must be > 0, got {config.rtg_scale!r}")
    tcfg = train_config(config.train)
    init_cfg = params = init_meta = None
    init_seed = config.get("init_seed", -1)
    if not isinstance(init_seed, int) or init_seed < -1:
        raise ValueError(f"config.init_seed: must be an int >= 0 (or -1: from config.seed), got {init_seed!r}")
    if config.init_from:
        if init_seed >= 0:
            raise ValueError("config.init_seed: cannot be combined with config.init_from (the params come from it)")
        init_cfg, params, init_meta = checkpoint.load(config.init_from)
    sample = None
    if init_cfg is not None and init_cfg.multi and len(tasks) == 1:  # finetune a multi-task model on one task
        cfg, task = init_cfg, tasks[0]
        t = cfg.task_index(task)
        st = init_meta["stats"][task]
        one = _load_task_data(task, datasets[0], cfg.context_len, cfg.max_ep_len, config.rtg_scale).replace(
            state_mean=jnp.asarray(st["state_mean"], jnp.float32), state_std=jnp.asarray(st["state_std"], jnp.float32))
        data = pad_to(one, cfg.state_dim, cfg.act_dim)
        sample = lambda d, k: sample_batch(d, k, tcfg.batch_size) | {
            "task_id": jnp.full((tcfg.batch_size,), t, jnp.int32)}
        meta = {"kind": "multi_task_finetune", "task": task, "finetuned_from": os.path.abspath(config.init_from),
                "tasks": list(cfg.task_names), "stats": init_meta["stats"]}
    elif len(tasks) > 1:
        cfg = init_cfg or model_config(config.model, 0, 0, tasks=[(t, *task_dims(t)) for t in tasks])
        if cfg.task_names != tuple(tasks):
            raise ValueError(f"config.init_from: {config.init_from} is a model for tasks {cfg.task_names}, "
                             f"not {tuple(tasks)}")
        datas = [_load_task_data(task, path, cfg.context_len, cfg.max_ep_len, config.rtg_scale)
                 for task, path in zip(tasks, datasets)]
        data = stack_segment_data(datas)
        meta = {"kind": "multi_task", "tasks": tasks, "stats": {t: _stats_meta(d) for t, d in zip(tasks, datas)}}
    else:
        state_dim, act_dim = task_dims(tasks[0])
        cfg = init_cfg if init_cfg is not None else model_config(config.model, state_dim, act_dim)
        if (cfg.state_dim, cfg.act_dim) != (state_dim, act_dim):
            raise ValueError(f"config.init_from: {config.init_from} is a model for (state_dim, act_dim) = "
                             f"{(cfg.state_dim, cfg.act_dim)}, but task {tasks[0]!r} needs {(state_dim, act_dim)}")
        data = _load_task_data(tasks[0], datasets[0], cfg.context_len, cfg.max_ep_len, config.rtg_scale)
        meta = {"kind": "single_task", "task": tasks[0]} | _stats_meta(data)
    model_dir = os.path.join(workdir, "model")
    # the device count is not part of the run: a run may resume on other devices
    run_config_guard(workdir, {k: v for k, v in _plain(config).items() if k != "mesh_devices"})
    if os.path.exists(os.path.join(model_dir, checkpoint.META_FILE)):
        print(f"already trained: {model_dir}")
        return model_dir
    if init_seed >= 0:
        params = init_params_for_seed(cfg, init_seed)
    rows = jax.eval_shape(sample or default_sampler(cfg, tcfg), data, jax.random.key(0))["mask"].shape[0]
    state = fit(cfg, tcfg, data, num_steps=config.num_steps, workdir=workdir, seed=config.seed, params=params,
                steps_per_call=config.steps_per_call, checkpoint_every=config.checkpoint_every,
                log_every=config.log_every, sample=sample, desc=f"train {config.task}",
                mesh=sharding.mesh_for(rows, config.get("mesh_devices", 0)))
    meta |= {"dataset": config.dataset, "rtg_scale": float(config.rtg_scale), "steps": int(state.step),
             "seed": int(config.seed), "init_seed": int(init_seed), "train": _plain(config.train)}
    params = jax.device_get(state.params)
    if jax.process_index() == 0:  # across hosts, process 0 writes the model and the others wait
        model_dir = checkpoint.save(model_dir, params, cfg, meta)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("mdt_jax model saved")
    return model_dir


def results_table(rows: list[dict], keys=("task", "episodes", "return_mean", "return_std", "return_over_target",
                                          "normalized", "length_mean")) -> str:
    """A Markdown table of result rows."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def evaluate_from_config(config, workdir: str) -> str:
    """Run configs/evaluate.py: load the checkpoint, evaluate, write `workdir/eval.json`; returns the table."""
    import time

    from tqdm import tqdm

    from mdt_jax import envs, evaluate as ev

    if not config.checkpoint:
        raise ValueError("config.checkpoint: no checkpoint given")
    for f in ("episodes", "max_steps"):
        if config[f] <= 0:
            raise ValueError(f"config.{f}: must be a positive int, got {config[f]}")
    cfg, params, meta = checkpoint.load(config.checkpoint)
    if "state_mean" not in meta and "stats" not in meta:
        raise ValueError(f"config.checkpoint: {config.checkpoint} has no normalisation stats in its metadata "
                         "(not a trained DT policy)")
    own = list(cfg.task_names) if cfg.multi else [meta.get("task")]
    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()] or own
    for t in tasks:
        envs.get_task(t)
    if config.target_return < 0:
        raise ValueError(f"config.target_return: must be >= 0, got {config.target_return}")
    stats = {}
    for t in tasks:
        src = t if cfg.multi else (meta.get("task") if t not in own else t)
        s = ev.stats_from_metadata(meta, src if cfg.multi else None)
        target = config.target_return or envs.target_return(t)
        stats[t] = ev.TaskStats(s.state_mean, s.state_std, target, s.rtg_scale)
    out = os.path.join(workdir, "eval.json")
    os.makedirs(workdir, exist_ok=True)
    total = config.episodes * config.max_steps * len(tasks)
    bar = tqdm(total=total, unit="env-step", unit_scale=True, desc="evaluate", dynamic_ncols=True)
    t0 = time.perf_counter()
    results = ev.evaluate(cfg, params, tasks, stats, episodes=config.episodes, max_steps=config.max_steps,
                          seed=config.seed, executor=config.executor, progress=bar.update)
    bar.close()
    wall = time.perf_counter() - t0
    rows = [r.summary() for r in results]
    report = {"checkpoint": os.path.abspath(config.checkpoint), "executor": envs.resolve_executor(config.executor),
              "seed": config.seed, "wall_s": wall, "env_steps": int(sum(r.lengths.sum() for r in results)),
              "results": rows, "episodes": {r.task: {"returns": r.returns[0].tolist(),
                                                     "lengths": r.lengths[0].tolist()} for r in results}}
    write_json_atomic(out, report)
    nan = sum(r["nan_action_steps"] for r in rows)
    warn = f"\nwarning: {nan} steps had non-finite actions (replaced by 0)" if nan else ""
    return results_table(rows) + warn


def collect_from_config(config, workdir: str) -> str:
    """Run configs/collect.py: a D4RL-layout HDF5 at `workdir/<task>-<quality>.hdf5`."""
    path = os.path.join(workdir, f"{config.task}-{config.quality}.hdf5")
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; use a new --workdir or remove it")
    task_dims(config.task)
    if config.quality not in QUALITIES:
        raise ValueError(f"config.quality: unknown {config.quality!r}; choose one of {QUALITIES}")
    if config.transitions <= 0:
        raise ValueError(f"config.transitions: must be a positive int, got {config.transitions}")
    os.makedirs(workdir, exist_ok=True)
    return collect_dataset(config.task, config.quality, config.transitions, path, seed=config.seed,
                           num_envs=config.num_envs, slot_steps=config.slot_steps)


def _floats(value) -> list[float]:
    try:
        return [float(v) for v in split_list(value)]
    except ValueError as e:
        raise ValueError(f"expected comma-separated numbers, got {value!r}") from None


def _stage(workdir: str, key: str, fn):
    """Run `fn()` once per workdir: its JSON result is kept in `workdir/stages/<key>.json` and reused."""
    path = os.path.join(workdir, "stages", f"{key}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    out = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, out)
    return out


def _save_once(directory: str, params, cfg, meta) -> str:
    """Save a checkpoint unless a complete one is already there (a resumed run)."""
    if os.path.exists(os.path.join(directory, checkpoint.META_FILE)):
        return os.path.abspath(directory)
    return checkpoint.save(directory, params, cfg, meta)


def _load_fishers(paths: list[str]) -> list[dict]:
    from mdt_jax.fisher import load_fisher
    return [load_fisher(p)[0].fisher for p in paths]


def _evaluate_rows(cfg, params, meta, config, *, stacked_coeffs=None, extra=None) -> list[dict]:
    """Evaluate one model (or stacked candidates) on every task its dims fit; one row per (candidate, task)."""
    from mdt_jax import envs, evaluate as ev

    if cfg.multi:
        tasks = list(cfg.task_names)
        stats = {t: ev.stats_from_metadata(meta, t) for t in tasks}
    elif config.eval.get("own_task", False):
        tasks = [meta["task"]]
    else:
        tasks = [t for t in envs.TASKS if task_dims(t) == (cfg.state_dim, cfg.act_dim)]
    if not cfg.multi:
        own = ev.stats_from_metadata(meta)
        stats = {t: ev.TaskStats(own.state_mean, own.state_std, envs.target_return(t), own.rtg_scale) for t in tasks}
    results = ev.evaluate(cfg, params, tasks, stats, episodes=config.eval.episodes, max_steps=config.eval.max_steps,
                          seed=config.seed, executor=config.eval.executor)
    rows = []
    for i, coeffs in enumerate(stacked_coeffs or [{}]):
        for r in results:
            rows.append(r.summary(i) | (extra or {}) | ({"coefficients": coeffs} if coeffs else {}))
    return rows


def merge_from_config(config, workdir: str) -> str:
    """Run configs/merge.py: P1, P2 or P3 over trained checkpoints; evaluate; write merge.json."""
    from mdt_jax import merge as M, pipelines as P

    if config.pipeline not in ("p1", "p2", "p3"):
        raise ValueError(f"config.pipeline: unknown {config.pipeline!r}; choose p1, p2 or p3")
    if config.method not in ("average", "fisher"):
        raise ValueError(f"config.method: unknown merge method {config.method!r} for {config.pipeline}; "
                         "choose average or fisher (task arithmetic, TIES and DARE run as P3 grids)")
    align = bool(config.get("align", False))
    if align and config.pipeline != "p1":
        raise ValueError(f"config.align: permutation alignment is for P1 (independent inits), not {config.pipeline}")
    paths = split_list(config.checkpoints)
    if len(paths) < 2:
        raise ValueError(f"config.checkpoints: need at least 2 models to merge, got {len(paths)}")
    if os.path.exists(os.path.join(workdir, "merge.json")):
        raise FileExistsError(f"{workdir} already holds a merge (merge.json); use a new --workdir")
    run_config_guard(workdir, _plain(config))  # a killed run resumes; a different one is refused
    loaded = [checkpoint.load(p) for p in paths]
    fishers = None
    if config.method == "fisher":
        fpaths = split_list(config.fishers)
        if len(fpaths) != len(paths):
            raise ValueError(f"config.fishers: method=fisher needs one Fisher per checkpoint ({len(paths)}), "
                             f"got {len(fpaths)}")
        fishers = _load_fishers(fpaths)
    coeffs = {"weights": jnp.asarray(_floats(config.weights))} if config.weights and config.method == "average" \
        else ({"floor": config.floor, "normalize_trace": config.normalize_trace} if config.method == "fisher" else {})
    subset = config.subset or (P.P1_SUBSET if config.pipeline == "p1" else P.P2_SUBSET)
    record = {"pipeline": config.pipeline, "method": config.method, "subset": subset, "models": paths, "align": align,
              "fishers": split_list(config.fishers) if fishers else [],
              "coefficients": {k: (np.asarray(v).tolist()) for k, v in coeffs.items()}}
    rows: list[dict] = []
    os.makedirs(workdir, exist_ok=True)
    if config.pipeline == "p1":
        if any(c.multi for c, _, _ in loaded):
            raise ValueError("config.checkpoints: P1 merges single-task DTs; got a multi-task checkpoint")
        names = [m.get("task", "model") for _, _, m in loaded]
        names = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]  # e.g. two seeds of a task
        merged = P.p1_merge([p for _, p, _ in loaded], config.method, fishers, subset=subset, names=names,
                            align=align, cfgs=[c for c, _, _ in loaded], align_seed=config.seed, **coeffs)
        record["merged_fraction"] = M.merged_fraction(P.trunk(loaded[0][1]), subset)
        for (cfg, orig, meta), name, params in zip(loaded, names, merged):
            out = _save_once(os.path.join(workdir, f"merged_{name}"), params, cfg, meta | {"merge": record})
            rows += _stage(workdir, f"eval_p1_{name}", lambda: _evaluate_rows(
                cfg, params, meta, config, extra={"model": f"p1_{config.method}[{name}]", "checkpoint": out}))
            if config.eval_inputs:
                rows += _stage(workdir, f"eval_unmerged_{name}", lambda: _evaluate_rows(
                    cfg, orig, meta, config, extra={"model": f"unmerged[{name}]"}))
    else:
        cfgs = {c for c, _, _ in loaded}
        if len(cfgs) != 1 or not next(iter(cfgs)).multi:
            raise ValueError("config.checkpoints: P2/P3 merge per-task finetunes of one multi-task DT "
                             "(all with the same multi-task config)")
        cfg = cfgs.pop()
        by_task = {m.get("task"): (p, m) for _, p, m in loaded}
        if set(by_task) != set(cfg.task_names):
            raise ValueError(f"config.checkpoints: need one finetune per task {cfg.task_names}, got {sorted(map(str, by_task))}")
        order = [by_task[t][0] for t in cfg.task_names]
        meta = by_task[cfg.task_names[0]][1]
        if fishers is not None:
            fishers = [fishers[[m.get("task") for _, _, m in loaded].index(t)] for t in cfg.task_names]
        merged = P.p2_merge(cfg, order, config.method, fishers, subset=subset, **coeffs)
        record["merged_fraction"] = M.merged_fraction(merged, subset)
        meta_out = {k: meta[k] for k in ("stats", "tasks", "rtg_scale") if k in meta} | {"kind": "multi_task_merged",
                                                                                          "merge": record}
        out = _save_once(os.path.join(workdir, "merged"), merged, cfg, meta_out)
        rows += _stage(workdir, "eval_p2", lambda: _evaluate_rows(
            cfg, merged, meta, config, extra={"model": f"p2_{config.method}", "checkpoint": out}))
        for t, p in zip(cfg.task_names, order if config.eval_inputs else ()):
            rows += _stage(workdir, f"eval_finetune_{t}", lambda: _evaluate_rows(
                cfg, p, meta, config, extra={"model": f"finetune_{t}"}))
        if config.pipeline == "p3":
            if not config.base:
                raise ValueError("config.base: P3 needs the multi-task model before finetuning")
            base_cfg, pre, _ = checkpoint.load(config.base)
            if base_cfg != cfg:
                raise ValueError(f"config.base: {config.base} is not the model these finetunes came from (config differs)")
            if config.eval_inputs:
                rows += _stage(workdir, "eval_pre", lambda: _evaluate_rows(cfg, pre, meta, config,
                                                                           extra={"model": "pre"}))
            grids = P.p3_candidates(cfg, pre, order, merged, lerp_ps=_floats(config.lerp_ps),
                                    ta_lams=_floats(config.ta_lams), ties_ks=_floats(config.ties_ks),
                                    ties_lams=_floats(config.ties_lams), dare_ps=_floats(config.dare_ps),
                                    rng=jax.random.key(config.seed), subset=subset)
            record["p3_best"] = {}
            for name, (cands, grid) in grids.items():
                grid_rows = _stage(workdir, f"eval_p3_{name}", lambda: _evaluate_rows(
                    cfg, cands, meta, config, stacked_coeffs=grid, extra={"model": f"p3_{name}"}))
                rows += grid_rows
                means = [np.mean([r["normalized"] for r in grid_rows if r["coefficients"] == c]) for c in grid]
                best = int(np.argmax(means))
                record["p3_best"][name] = {"coefficients": grid[best], "normalized_mean": float(means[best])}
                _save_once(os.path.join(workdir, f"p3_{name}_best"), jax.tree.map(lambda x: x[best], cands), cfg,
                           meta_out | {"merge": record | {"method": name, "coefficients": grid[best]}})
    write_json_atomic(os.path.join(workdir, "merge.json"), {"merge": record, "rows": rows})
    return results_table(rows, keys=("model", "coefficients", "task", "episodes", "return_mean", "return_std",
                                     "return_over_target", "normalized"))


def behaviour_backend(backend: str) -> str:
    """The trainer ("native" or "brax") for configs/behaviour.py's `backend`; "auto": brax on a GPU or TPU."""
    if backend == "auto":
        return "brax" if jax.default_backend() in ("gpu", "tpu") else "native"
    if backend not in ("native", "brax"):
        raise ValueError(f"config.backend: unknown {backend!r}; choose native, brax or auto")
    return backend


def train_behaviour_from_config(config, workdir: str) -> str:
    """Run configs/behaviour.py: SAC on the native executor (mdt_jax.behaviour.sac) or Brax's SAC
    on MJX (mdt_jax.behaviour.brax_sac), by `config.backend`."""
    import shlex
    import sys

    backend = behaviour_backend(config.backend)
    command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m", "launch.train_behaviour"]
                       + sys.argv[1:])
    if backend == "brax":
        from mdt_jax.behaviour import brax_sac

        return brax_sac.train(config.task, workdir, env_steps=int(config.env_steps),
                              cfg=brax_sac.BraxSACConfig(**_plain(config.brax)), seed=int(config.seed),
                              save_every=int(config.save_every), eval_episodes=int(config.eval_episodes),
                              command=command, log=lambda s: print(s, flush=True))
    from mdt_jax.behaviour import sac

    cfg = sac.SACConfig(**_plain(config.sac))
    return sac.train(config.task, workdir, env_steps=int(config.env_steps), cfg=cfg, seed=int(config.seed),
                     save_every=int(config.save_every), eval_every=int(config.eval_every),
                     eval_episodes=int(config.eval_episodes), stop_return=float(config.stop_return),
                     command=command, log=lambda s: print(s, flush=True))


def select_behaviour_from_config(config, workdir: str) -> str:
    """Run configs/select_behaviour.py: pick the expert and medium checkpoints of a behaviour run.

    Every saved actor in WORKDIR/policies is evaluated on `episodes` episodes (deterministic,
    tanh(mean)); the expert is the best; the medium is the checkpoint whose mean return is
    closest to `medium_fraction` of the expert's, within [medium_min, medium_max] of it. Both are
    evaluated again stochastically (how datasets are collected) and saved with their returns, the
    training command, seed and wall time to `out` (by default the package's committed policies).
    """
    from mdt_jax.behaviour import policy as pol
    from mdt_jax.behaviour.sac import evaluate_policy

    task = config.task
    task_dims(task)
    if not 0 < config.medium_min <= config.medium_fraction <= config.medium_max < 1:
        raise ValueError("config.medium_min <= config.medium_fraction <= config.medium_max must lie in (0, 1)")
    root = os.path.join(workdir, "policies")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no behaviour policies (run launch.train_behaviour first)")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    if not steps:
        raise FileNotFoundError(f"{root}: no step_* checkpoints")
    out = config.out or os.path.join(POLICIES_DIR, task)
    if not config.overwrite:
        for q in ("expert", "medium"):
            if os.path.exists(os.path.join(out, q)):
                raise FileExistsError(f"{os.path.join(out, q)} exists; pass --config.overwrite=True to replace it")
    scores = {}
    for s in steps:
        cfg, params, meta = pol.load_policy(os.path.join(root, s))
        if cfg.task != task:
            raise ValueError(f"{root}/{s}: a policy for {cfg.task!r}, not {task!r}")
        r = evaluate_policy(task, params, config.episodes, seed=config.seed, std=cfg.std)
        scores[s] = (float(r.mean()), float(r.std()))
        print(f"{task} {s}: {scores[s][0]:9.1f} ± {scores[s][1]:7.1f}", flush=True)
    expert = max(scores, key=lambda s: scores[s][0])
    best = scores[expert][0]
    inside = [s for s in scores if config.medium_min * best <= scores[s][0] <= config.medium_max * best]
    if not inside:
        raise ValueError(f"{root}: no checkpoint scores within [{config.medium_min}, {config.medium_max}] of the "
                         f"expert's {best:.1f}; save checkpoints more often")
    medium = min(inside, key=lambda s: abs(scores[s][0] - config.medium_fraction * best))
    summary = {}
    for q, s in (("expert", expert), ("medium", medium)):
        cfg, params, meta = pol.load_policy(os.path.join(root, s))
        stoch = evaluate_policy(task, params, config.episodes, seed=config.seed, deterministic=False, std=cfg.std)
        sel = {"checkpoint": s, "episodes": int(config.episodes), "eval_seed": int(config.seed),
               "return_mean": scores[s][0], "return_std": scores[s][1],
               "stochastic_return_mean": float(stoch.mean()), "stochastic_return_std": float(stoch.std()),
               "fraction_of_expert": scores[s][0] / best}
        pol.save_policy(os.path.join(out, q), params, cfg, meta | {"quality": q, "selection": sel},
                        overwrite=bool(config.overwrite))
        summary[q] = sel | {"env_steps": meta.get("env_steps"), "wall_s": meta.get("wall_s"),
                            "seed": meta.get("seed"), "command": meta.get("command")}
    write_json_atomic(os.path.join(out, "selection.json"), {"task": task, "scores": scores, **summary})
    return json.dumps(summary, indent=1)
