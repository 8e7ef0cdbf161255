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
