"""Glue from ml_collections configs to library calls (used by the absl launchers and notebooks)."""
from __future__ import annotations

import os

import jax
import numpy as np

from mdt_jax import checkpoint
from mdt_jax.models.dt import DTConfig
from mdt_jax.train import TrainConfig, fit, run_config_guard


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


def train_from_config(config, workdir: str) -> str:
    """Train one single-task DT as `config` (configs/train.py) says; returns the model folder.

    Resumes from `workdir/checkpoints` when run again with the same config; refuses a workdir that
    holds a different run.
    """
    from mdt_jax.data import load_dataset, segment_data

    if not config.dataset:
        raise ValueError("config.dataset: no dataset given (a .hdf5/.pkl path or minari:<id>)")
    state_dim, act_dim = task_dims(config.task)
    ds = load_dataset(config.dataset)
    got = (ds.observations.shape[1], ds.actions.shape[1])
    if got != (state_dim, act_dim):
        raise ValueError(f"config.dataset: {config.dataset} has (state_dim, act_dim) = {got}, but task "
                         f"{config.task!r} needs {(state_dim, act_dim)}")
    cfg = model_config(config.model, state_dim, act_dim)
    tcfg = train_config(config.train)
    if not (isinstance(config.rtg_scale, (int, float)) and config.rtg_scale > 0):
        raise ValueError(f"config.rtg_scale: must be > 0, got {config.rtg_scale!r}")
    data = segment_data(ds, context_len=cfg.context_len, max_ep_len=cfg.max_ep_len, rtg_scale=config.rtg_scale)
    params = None
    if config.init_from:
        init_cfg, params, _ = checkpoint.load(config.init_from)
        if init_cfg != cfg:
            raise ValueError(f"config.init_from: {config.init_from} holds a model with config {init_cfg}, "
                             f"which differs from this run's {cfg}")
    model_dir = os.path.join(workdir, "model")
    run_config_guard(workdir, _plain(config))
    if os.path.exists(os.path.join(model_dir, checkpoint.META_FILE)):
        print(f"already trained: {model_dir}")
        return model_dir
    state = fit(cfg, tcfg, data, num_steps=config.num_steps, workdir=workdir, seed=config.seed, params=params,
                steps_per_call=config.steps_per_call, checkpoint_every=config.checkpoint_every,
                log_every=config.log_every)
    meta = {"kind": "single_task", "task": config.task, "dataset": config.dataset,
            "state_mean": np.asarray(data.state_mean).tolist(), "state_std": np.asarray(data.state_std).tolist(),
            "rtg_scale": float(config.rtg_scale), "steps": int(state.step), "seed": int(config.seed),
            "train": _plain(config.train)}
    return checkpoint.save(model_dir, jax.device_get(state.params), cfg, meta)


def results_table(rows: list[dict], keys=("task", "episodes", "return_mean", "return_std", "return_over_target",
                                          "normalized", "length_mean")) -> str:
    """A Markdown table of result rows."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_json_atomic(path: str, obj) -> None:
    import json
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def collect_dataset(task: str, quality: str, transitions: int, path: str, *, seed: int = 0,
                    num_envs: int = 64) -> str:
    """Make (or reuse, if `path` exists) a dataset of `quality` for `task`; returns the path."""
    from tqdm import tqdm

    from mdt_jax.behaviour.collect import collect, uniform_policy
    from mdt_jax.data import save_d4rl_hdf5

    if os.path.exists(path):
        return path
    if quality != "random":
        raise ValueError(f"data.quality: {quality!r} needs trained behaviour policies, which this build lacks; "
                         "use 'random'")
    with tqdm(total=transitions, unit="transition", unit_scale=True, desc=f"collect {task}") as bar:
        ds = collect(task, uniform_policy(task_dims(task)[1]), transitions, num_envs=num_envs, seed=seed,
                     progress=bar.update, metadata={"policy": "uniform_random", "quality": quality})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_d4rl_hdf5(ds, path)
    return path


def quickstart(config, workdir: str) -> str:
    """configs/quickstart.py: collect -> train -> evaluate per task; writes results.{json,md}."""
    from mdt_jax import envs, evaluate as ev
    from mdt_jax.data import load_d4rl_hdf5

    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("config.tasks: no tasks")
    for t in tasks:
        envs.get_task(t)
    rows = []
    for task in tasks:
        path = collect_dataset(task, config.data.quality, config.data.transitions,
                               os.path.join(workdir, "data", f"{task}-{config.data.quality}.hdf5"),
                               seed=config.seed, num_envs=config.data.num_envs)
        tc = config.train.copy_and_resolve_references()
        with tc.unlocked():
            tc.task, tc.dataset, tc.seed = task, path, config.seed
        model_dir = train_from_config(tc, os.path.join(workdir, f"dt_{task}"))
        cfg, params, meta = checkpoint.load(model_dir)
        stats = {task: ev.stats_from_metadata(meta)}
        res = ev.evaluate(cfg, params, [task], stats, episodes=config.eval.episodes,
                          max_steps=config.eval.max_steps, seed=config.seed, executor=config.eval.executor)[0]
        data_meta = load_d4rl_hdf5(path).metadata
        behaviour = data_meta["return_mean"]
        rows.append(res.summary() | {"model": "dt", "dataset": os.path.basename(path),
                                     "behaviour_return": behaviour,
                                     "behaviour_normalized": float(envs.normalized_score(task, behaviour))})
    write_json_atomic(os.path.join(workdir, "results.json"), {"rows": rows})
    table = results_table(rows, keys=("task", "model", "episodes", "return_mean", "return_std", "return_over_target",
                                      "normalized", "behaviour_return", "behaviour_normalized"))
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
    return table
