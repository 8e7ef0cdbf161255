"""One way to turn a dataset spec into a task's training data, and the registry of spec resolvers.

A spec is a path (``.hdf5``/``.h5`` D4RL layout, ``.pkl`` reference pickle), ``minari:<id>``, or a
spec with a registered prefix that a resolver turns into one of those. `generated:` (datasets the
project makes from its committed behaviour policies) is registered by `mdt_jax.behaviour.datasets`
when that module is imported, so this package does not depend on the behaviour code.
"""
from __future__ import annotations

from typing import Callable

from mdt_jax.data.formats import load_dataset
from mdt_jax.data.normalizer import Normalizer
from mdt_jax.data.sampler import SegmentData, segment_data

_RESOLVERS: dict[str, Callable[[str], str]] = {}


def register_resolver(prefix: str, resolve_fn: Callable[[str], str]) -> None:
    """Specs starting with `prefix` (e.g. ``"generated:"``) are turned into a loadable spec by
    `resolve_fn(spec)` (which may make the dataset first)."""
    if not prefix or not prefix.endswith(":"):
        raise ValueError(f"a resolver prefix ends with ':', got {prefix!r}")
    _RESOLVERS[prefix] = resolve_fn


def resolve(spec: str, field: str = "config.dataset") -> str:
    """The loadable spec behind `spec` (unchanged unless a registered prefix matches)."""
    if isinstance(spec, str):
        for prefix, fn in _RESOLVERS.items():
            if spec.startswith(prefix):
                return fn(spec)
        if spec.startswith("generated:"):
            raise ValueError(f"{field}: {spec!r} needs the generated-dataset resolver; import "
                             "mdt_jax.behaviour.datasets first (the launchers do)")
    return spec


def load_task_data(spec: str, task: str, cfg, norm: Normalizer | None = None, *, rtg_scale: float = 1000.0,
                   field: str = "config.dataset") -> SegmentData:
    """Task `task`'s data from `spec`, segmented for DT config `cfg` (its context_len, max_ep_len).

    The dataset's dims must be the task's dims in `cfg` (a multi-task config's spec of that task,
    else the single-task config's). With `norm` (a model's own normaliser: a finetune, a Fisher or
    Gram of that model) the data is normalised with it and its rtg_scale; without, with the
    dataset's own statistics and `rtg_scale`."""
    if cfg.multi:
        if task not in cfg.task_names:
            raise ValueError(f"{field}: task {task!r} is not one of the model's tasks {list(cfg.task_names)}")
        t = cfg.tasks[cfg.task_index(task)]
        want = (t.state_dim, t.act_dim)
    else:
        want = (cfg.state_dim, cfg.act_dim)
    ds = load_dataset(resolve(spec, field))
    got = (ds.observations.shape[1], ds.actions.shape[1])
    if got != want:
        raise ValueError(f"{field}: {spec} has (state_dim, act_dim) = {got}, but task {task!r} needs {want}")
    data = segment_data(ds, context_len=cfg.context_len, max_ep_len=cfg.max_ep_len,
                        rtg_scale=norm.rtg_scale if norm is not None else rtg_scale)
    return norm.apply_to(data) if norm is not None else data


def model_task_data(model, datasets: list[str], *, one_task: bool, field: str = "config.dataset"
                    ) -> tuple[list[str], SegmentData, str | None]:
    """The data a statistic of `model` (a `checkpoint.Model`: Fisher, Gram) is computed on, each task
    normalised with the model's own normaliser: (tasks, data, task).

    A single-task model, or with `one_task` a multi-task model's finetune on the task its metadata
    names: one dataset, `task` is that task (None for single-task). Otherwise one dataset per task
    of the multi-task model, in its order, stacked (`stack_segment_data`), `task` None."""
    from mdt_jax.data.sampler import stack_segment_data

    cfg, meta = model.cfg, model.metadata
    if not cfg.multi or one_task:
        task = meta.get("task") if cfg.multi else ((model.tasks[0] or None) if model.tasks else None)
        if cfg.multi and task not in cfg.task_names:
            raise ValueError(f"config.spec_info: the checkpoint names no task of its model {list(cfg.task_names)} "
                             f"(metadata task={task!r}); spec_info needs a per-task finetune")
        if len(datasets) != 1:
            raise ValueError(f"{field}: expected one dataset for task {task!r}, got {len(datasets)}")
        data = load_task_data(datasets[0], task, cfg, _norm_of(model, task), field=field)
        return [task], data, task if cfg.multi else None
    tasks = list(cfg.task_names)
    if len(datasets) != len(tasks):
        raise ValueError(f"{field}: the model has tasks {tasks}; give one dataset per task in that order, "
                         f"got {len(datasets)}")
    datas = [load_task_data(p, t, cfg, _norm_of(model, t), field=field) for p, t in zip(datasets, tasks)]
    return tasks, stack_segment_data(datas), None


def _norm_of(model, task):
    try:
        return model.norm(task)
    except ValueError as e:
        raise ValueError(f"config.checkpoint: {e}") from None
