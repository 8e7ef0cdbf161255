"""Model checkpoints: everything needed to use a DT, rebuilt from the folder alone.

A model artifact carries its config, its params and, per task it serves, the observation
normaliser it was trained with (`mdt_jax.data.Normalizer`; brax keeps the normaliser with the
policy the same way), so evaluating, finetuning or computing a Fisher of it never needs the
training dataset's statistics again. `load` returns a `Model`.

Layout of a checkpoint folder::

    DIR/mdt.json    {"format": "mdt_jax.dt", "format_version": 2, "config": DTConfig,
                     "tasks": [task, ...], "norms": {task: {state_mean, state_std, rtg_scale}},
                     "metadata": {...}}
    DIR/params/     orbax StandardCheckpointer pytree (plain nested dict)

Version 1 folders (statistics inside the metadata: top-level ``state_mean``/``state_std`` and
``task`` for single-task models, ``stats[task]`` for multi-task ones, ``rtg_scale`` beside them)
still load: `upgrade_header` is the one converter between the layouts.

Writes are atomic: the folder is assembled under a temporary sibling name and renamed into
place, so a reader sees either no checkpoint or a complete one. An existing checkpoint is
never replaced unless `overwrite=True`. `load` validates the JSON and every array's shape and
dtype against the config before anything is restored.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import numpy as np

from mdt_jax import trees
from mdt_jax.data.normalizer import Normalizer
from mdt_jax.fileio import orbax_writer, read_header, read_params_dir, write_dir_atomic, write_json_atomic
from mdt_jax.models.dt import DTConfig, param_shapes

FORMAT = "mdt_jax.dt"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "mdt.json"
LEGACY_STAT_KEYS = ("state_mean", "state_std", "stats", "rtg_scale")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, not a DT, or does not match its config."""


def tree_paths(tree) -> dict[str, Any]:
    """{'block_0/attn/c_attn/kernel': leaf, ...} for a nested-dict pytree (`trees.flatten`)."""
    return trees.flatten(tree)


def check_params(cfg: DTConfig, params, what: str = "params") -> None:
    """Raise CheckpointError listing every path whose presence, shape or dtype differs from cfg."""
    want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in tree_paths(param_shapes(cfg)).items()}
    got = {k: (tuple(np.shape(v)), np.dtype(getattr(v, "dtype", np.float32))) for k, v in tree_paths(params).items()}
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: shape/dtype {got[k]} != expected {want[k]}" for k in sorted(set(want) & set(got))
                 if got[k] != want[k]]
    if problems:
        raise CheckpointError(f"{what} do not fit the DT config: " + "; ".join(problems[:20])
                              + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""))


def _json_safe(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from None


def _check_loaded(cfg: DTConfig, params, where: str) -> None:
    check_params(cfg, params, what=where)
    trees.check_finite(params, error=CheckpointError, where=where)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded checkpoint: `norms[task]` is the normaliser of each task in `tasks` (its order: the
    multi-task config's, or the single task's name; empty for a model saved without statistics,
    e.g. an imported one)."""

    cfg: DTConfig
    params: Any
    norms: Mapping[str, Normalizer]
    tasks: tuple[str, ...]
    metadata: dict

    def norm(self, task: str | None = None) -> Normalizer:
        """The normaliser of `task`. A single-task model has one, whatever env it is run in: `task`
        is ignored for it."""
        if not self.cfg.multi:
            if not self.norms:
                raise ValueError("the model was saved without the statistics of its training data "
                                 "(state_mean/state_std); cannot normalise observations")
            return next(iter(self.norms.values()))
        if task is None:
            raise ValueError(f"the model serves tasks {list(self.tasks)}; name one")
        if task not in self.norms:
            raise ValueError(f"the model has no normaliser for task {task!r} (has {sorted(self.norms)}); "
                             "it was saved without the statistics of that task's training data")
        return self.norms[task]

    def __iter__(self):
        """Unpacks as ``cfg, params, metadata``, the triple `load` returned before models carried
        their normalisers, so scripts written against that API keep working."""
        return iter((self.cfg, self.params, self.metadata))


def legacy_norms(metadata: Mapping, cfg: DTConfig) -> tuple[tuple[str, ...], dict[str, Normalizer]]:
    """(tasks, norms) from a version-1 metadata dict: top-level `state_mean`/`state_std` (+ `task`)
    for single-task models, `stats[task]` for multi-task ones, `rtg_scale` beside them (default
    1000). Metadata without statistics gives no normalisers."""
    scale = metadata.get("rtg_scale", 1000.0)
    if cfg.multi or "stats" in metadata:
        stats = metadata.get("stats") or {}
        if not isinstance(stats, Mapping):
            raise CheckpointError(f"metadata.stats: expected {{task: statistics}}, got {type(stats).__name__}")
        tasks = tuple(cfg.task_names) if cfg.multi else tuple(stats)
        return tasks, {t: _norm(stats[t] | {"rtg_scale": scale}, f"metadata.stats.{t}") for t in tasks if t in stats}
    task = metadata.get("task")
    if "state_mean" not in metadata:
        return ((task,) if task else ()), {}
    name = task or ""  # a single-task model that does not name its task
    return (name,), {name: _norm(dict(metadata) | {"rtg_scale": scale}, "metadata")}


def _norm(d, where: str) -> Normalizer:
    try:
        return Normalizer.from_dict(d, where)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def upgrade_header(header: dict, cfg: DTConfig) -> dict:
    """The one converter from older mdt.json layouts to the current one (version 1 -> 2: the
    statistics move out of the metadata into `tasks` and `norms`)."""
    if header.get("format_version") == FORMAT_VERSION:
        return header
    metadata = dict(header.get("metadata") or {})
    tasks, norms = legacy_norms(metadata, cfg)
    metadata = {k: v for k, v in metadata.items() if k not in LEGACY_STAT_KEYS}
    return header | {"format_version": FORMAT_VERSION, "tasks": list(tasks),
                     "norms": {t: n.to_dict() for t, n in norms.items()}, "metadata": metadata}


def _check_norms(cfg: DTConfig, tasks, norms: Mapping[str, Normalizer], where: str) -> None:
    if cfg.multi and tuple(tasks) != tuple(cfg.task_names):
        raise CheckpointError(f"{where}: tasks {list(tasks)} differ from the config's {list(cfg.task_names)}")
    if not cfg.multi and len(tasks) > 1:
        raise CheckpointError(f"{where}: a single-task model names {len(tasks)} tasks {list(tasks)}")
    for t, n in norms.items():
        if t not in tasks:
            raise CheckpointError(f"{where}: a normaliser for {t!r}, which is not one of the tasks {list(tasks)}")
        want = cfg.tasks[cfg.task_index(t)].state_dim if cfg.multi else cfg.state_dim
        if n.state_dim != want:
            raise CheckpointError(f"{where}: norms.{t} has {n.state_dim} state dims, the model's task has {want}")


def save(directory: str | os.PathLike, params, config: DTConfig, metadata: dict | None = None, *,
         norms: Mapping[str, Normalizer] | None = None, tasks=None, overwrite: bool = False) -> str:
    """Atomically write params + config + per-task normalisers (+ JSON metadata) to `directory`.

    `norms` {task: Normalizer}; `tasks` defaults to the multi-task config's tasks, or the single
    task of `norms`. Without `norms`, statistics given in the version-1 metadata layout are taken
    from `metadata` (`legacy_norms`). Returns the path."""
    directory = os.path.abspath(os.fspath(directory))
    check_params(config, params)
    trees.check_finite(params, error=CheckpointError, where="refusing to save")
    metadata = dict(metadata or {})
    if norms is None:
        legacy_tasks, norms = legacy_norms(metadata, config)
        tasks = legacy_tasks if tasks is None else tasks
    metadata = {k: v for k, v in metadata.items() if k not in LEGACY_STAT_KEYS}
    norms = dict(norms)
    if tasks is None:
        tasks = tuple(config.task_names) if config.multi else tuple(norms)
    tasks = tuple(tasks)
    _check_norms(config, tasks, norms, "checkpoint.save")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(), "tasks": list(tasks),
            "norms": {t: n.to_dict() for t, n in norms.items()}, "metadata": _json_safe(metadata)}

    write_dir_atomic(directory, {"params": orbax_writer(params),
                                 META_FILE: lambda path: write_json_atomic(path, meta)}, overwrite=overwrite)
    return directory


def read_model_meta(directory: str | os.PathLike) -> Model:
    """Validate `DIR/mdt.json` (any readable version) and return its `Model` with `params=None`,
    without touching any array."""
    header = read_header(directory, META_FILE, FORMAT, READABLE_VERSIONS, CheckpointError, "DT checkpoint")
    path = os.path.join(os.fspath(directory), META_FILE)
    try:
        cfg = DTConfig.from_dict(header.get("config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config: {e}") from None
    header = upgrade_header(header, cfg)
    tasks, raw = header.get("tasks"), header.get("norms")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks) or not isinstance(raw, dict):
        raise CheckpointError(f"{path}: 'tasks' must be a list of names and 'norms' a {{task: statistics}} object")
    norms = {t: _norm(d, f"{path}: norms.{t}") for t, d in raw.items()}
    _check_norms(cfg, tasks, norms, path)
    metadata = header.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: 'metadata' must be an object")
    return Model(cfg, None, norms, tuple(tasks), metadata)


def read_meta(directory: str | os.PathLike) -> tuple[DTConfig, dict]:
    """(config, metadata) of `DIR/mdt.json`, without touching any array."""
    m = read_model_meta(directory)
    return m.cfg, m.metadata


def load(directory: str | os.PathLike) -> Model:
    """The `Model` in `directory`. Shapes are checked against the config before restoring."""
    directory = os.path.abspath(os.fspath(directory))
    m = read_model_meta(directory)
    params = read_params_dir(directory, CheckpointError, "DT checkpoint", param_shapes(m.cfg), functools.partial(
        _check_loaded, m.cfg))
    return dataclasses.replace(m, params=params)


def save_once(directory: str | os.PathLike, params, model: Model, metadata: dict) -> str:
    """Save `params` with `model`'s config, tasks and normalisers (and `metadata`) unless a
    complete checkpoint is already there (a resumed run)."""
    if os.path.exists(os.path.join(os.fspath(directory), META_FILE)):
        return os.path.abspath(os.fspath(directory))
    return save(directory, params, model.cfg, metadata, norms=model.norms, tasks=model.tasks)
