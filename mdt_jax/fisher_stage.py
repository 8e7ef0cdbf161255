"""The Fisher as a stage of the study: its on-disk artifact and the config-driven runs that write it.

Named `fisher_stage` because it is the edge of the Fisher: everything here reads or writes files
(checkpoints, datasets, partial sums, artifacts) around the pure computation in `mdt_jax.fisher`,
which stays importable and jittable without any of it.

Artifacts (`save_fisher` / `load_fisher`), written atomically and never overwritten::

    DIR/fisher.json   {"format": "mdt_jax.fisher", "format_version": 1, "method", "trace", "mean",
                       "n_timesteps", "n_batches", "metadata": {...}}
    DIR/fisher/       orbax StandardCheckpointer pytree: the Fisher tree (params layout)

Runs (configs/fisher.py, typed as `FisherRun`):

- `fisher_run(run, workdir)`: one checkpoint's Fisher on its own data (normalised with the
  checkpoint's own normalisers), through `compute_fisher`'s chunked path: every `chunk_batches`
  batches the partial sums are saved under WORKDIR.partial/ (`PartialFolder`), so a killed run
  resumes where it stopped, with the same result.
- `fisher_group_run(runs, workdirs)`: the Fishers of several checkpoints in one vmapped call
  (`compute_fishers`) per group of same-shaped models (single-task models of different tasks
  padded to the widest state and action), each member's artifact written exactly as `fisher_run`
  writes it; members already done are skipped. A group is one call, so it resumes per member,
  not per chunk.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import trees
from mdt_jax.data.sampler import SegmentData, pad_to, stack_segment_data
from mdt_jax.fileio import (Store, orbax_read, orbax_writer, read_header, run_config_guard, tree_codec,
                            write_dir_atomic, write_json_atomic)
from mdt_jax.fisher import (DEFAULT_SUBSET, METHODS, FisherError, FisherResult, compute_fisher, compute_fishers,
                            pad_params, unpad_result, widest_config)

FORMAT = "mdt_jax.fisher"
FORMAT_VERSION = 1
META_FILE = "fisher.json"
ARRAYS = "fisher"


def _check_values(tree, where: str) -> None:
    trees.check_finite(tree, error=FisherError, where=where, kind="Fisher values")
    trees.check_nonnegative(tree, error=FisherError, where=where, kind="Fisher values")


def save_fisher(directory, result: FisherResult, metadata: dict | None = None) -> str:
    """Atomically write one model's Fisher to `directory` (refused if it exists and is non-empty)."""
    directory = os.path.abspath(os.fspath(directory))
    if np.ndim(result.trace):
        raise FisherError(f"save_fisher: one model's Fisher only (trace has shape {np.shape(result.trace)}); "
                          "index the stacked result first")
    _check_values(result.fisher, f"save_fisher({directory})")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": result.method,
            "trace": float(result.trace), "mean": float(result.mean), "n_timesteps": int(result.n_timesteps),
            "n_batches": int(result.n_batches), "metadata": metadata or {}}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise FisherError(f"save_fisher: metadata is not JSON-serialisable: {e}") from None

    return write_dir_atomic(directory, {ARRAYS: orbax_writer(result.fisher), META_FILE: lambda p: write_json_atomic(p, meta)})


def load_fisher(directory) -> tuple[FisherResult, dict]:
    """(FisherResult, metadata) from a `save_fisher` folder; refuses anything that is not a
    complete Fisher artifact with finite, non-negative values (the error names the path)."""
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, META_FILE)
    meta = read_header(directory, META_FILE, FORMAT, FORMAT_VERSION, FisherError, "Fisher artifact")
    if meta.get("method") not in METHODS:
        raise FisherError(f"{path}: unknown method {meta.get('method')!r}")
    for k in ("trace", "mean"):
        v = meta.get(k)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise FisherError(f"{path}: {k} must be a finite number >= 0, got {v!r}")
    for k in ("n_timesteps", "n_batches"):
        if not isinstance(meta.get(k), int) or meta[k] <= 0:
            raise FisherError(f"{path}: {k} must be a positive int, got {meta.get(k)!r}")
    adir = os.path.join(directory, ARRAYS)
    fisher = orbax_read(adir, FisherError, "Fisher artifact")
    _check_values(fisher, adir)
    result = FisherResult(fisher=fisher, trace=jnp.float32(meta["trace"]), mean=jnp.float32(meta["mean"]),
                          n_timesteps=jnp.int32(meta["n_timesteps"]), n_batches=meta["n_batches"],
                          method=meta["method"])
    return result, meta.get("metadata") or {}


def load_fishers(paths: list[str]) -> list[dict]:
    """The Fisher trees of `save_fisher` folders, in order."""
    return [load_fisher(p)[0].fisher for p in paths]


class PartialFolder:
    """`mdt_jax.fisher.PartialSums` kept in a folder: a `fileio.Store` of one orbax tree per chunk
    (KEY/sums: {"sums": {"0": leaf sums, ...}, "n": timesteps}), reused when a run restarts."""

    def __init__(self, folder: str):
        self.folder = folder
        self._store = Store(folder, tree_codec("sums"), error=FisherError, what="partial Fisher")

    def get(self, key: str) -> dict | None:
        part = self._store.get(key)
        if part is None:
            return None
        return {"sums": [part["sums"][str(i)] for i in range(len(part["sums"]))], "n": part["n"]}

    def put(self, key: str, sums: dict) -> None:
        self._store.put(key, {"sums": {str(i): a for i, a in enumerate(sums["sums"])}, "n": np.asarray(sums["n"])})


# ------------------------------------------------------------------ edge: config -> Fisher files

@dataclasses.dataclass(frozen=True)
class FisherRun:
    """One Fisher computation (configs/fisher.py's fields, typed; see that file)."""

    checkpoint: str = ""
    dataset: tuple[str, ...] = ()
    method: str = "faithful"
    num_batches: int = 100
    batch_size: int = 64
    subset: str = "blocks"
    spec_info: bool = False
    chunk_batches: int = 25
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.dataset, str):
            raise TypeError("FisherRun.dataset: a tuple of dataset specs, not a string")
        object.__setattr__(self, "dataset", tuple(self.dataset))

    def run_config(self) -> dict:
        """This run in configs/fisher.py's layout, as the partial folder records it."""
        return dataclasses.asdict(self) | {"dataset": ",".join(self.dataset)}


@dataclasses.dataclass(frozen=True)
class _Member:
    """One run, checked and loaded: its model, data and the record its artifact carries."""

    config: FisherRun
    workdir: str
    partial: str
    model: object
    tasks: list
    data: SegmentData
    task: str | None
    record: dict


def _check(config: FisherRun, workdir: str) -> None:
    if config.method not in METHODS:
        raise ValueError(f"config.method: unknown Fisher method {config.method!r}; choose one of {METHODS}")
    for f in ("num_batches", "batch_size"):
        if getattr(config, f) <= 0:
            raise ValueError(f"config.{f}: must be a positive int, got {getattr(config, f)}")
    if not config.checkpoint:
        raise ValueError("config.checkpoint: no model checkpoint given")
    if not config.dataset:
        raise ValueError("config.dataset: no dataset given (a .hdf5/.pkl path or minari:<id>)")
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise FileExistsError(f"{workdir} already exists and is not empty; use a new --workdir")
    cb = config.chunk_batches
    if not isinstance(cb, int) or cb <= 0:
        raise ValueError(f"config.chunk_batches: must be a positive int, got {cb!r}")


def _load(config: FisherRun, workdir: str) -> _Member:
    """The checkpoint and its data (its own normalisers)."""
    from mdt_jax import checkpoint
    from mdt_jax.data.loading import model_task_data

    model = checkpoint.load(config.checkpoint)
    partial = os.path.abspath(workdir).rstrip("/") + ".partial"
    datasets = list(config.dataset)
    tasks, data, task = model_task_data(model, datasets, one_task=bool(config.spec_info))
    record = {"checkpoint": os.path.abspath(config.checkpoint), "datasets": datasets, "tasks": tasks,
              "spec_info": bool(config.spec_info), "subset": config.subset or DEFAULT_SUBSET, "seed": int(config.seed),
              "batch_size": int(config.batch_size), "num_batches_per_task": int(config.num_batches)}
    return _Member(config, workdir, partial, model, tasks, data, task, record)


def _guard(m: _Member) -> None:
    """Refuse a partial folder left by a different run; record this run's config in it."""
    run_config_guard(m.partial, m.config.run_config() | {"checkpoint": m.record["checkpoint"]})


def _write(m: _Member, result: FisherResult) -> str:
    """Save one member's Fisher with its record, drop its partial folder; the one-line summary."""
    result = jax.device_get(result)
    out = save_fisher(m.workdir, result, m.record)
    shutil.rmtree(m.partial, ignore_errors=True)
    return (f"{m.config.method} Fisher over {result.n_batches} batches x {m.config.batch_size} "
            f"({int(result.n_timesteps)} timesteps) on {','.join(map(str, m.tasks))}: "
            f"trace {float(result.trace):.6g}, mean {float(result.mean):.6g} -> {out}")


def fisher_run(config: FisherRun, workdir: str) -> str:
    """Run configs/fisher.py: the Fisher of a checkpoint on its dataset(s) -> `workdir` (fisher/ +
    fisher.json), resumable per chunk of batches; returns a one-line summary."""
    _check(config, workdir)
    m = _load(config, workdir)
    _guard(m)
    result = compute_fisher(m.model.cfg, m.model.params, m.data, jax.random.key(config.seed),
                            num_batches=config.num_batches, batch_size=config.batch_size, method=config.method,
                            subset=m.record["subset"], **({"task": m.task} if m.task else {}),
                            chunk_batches=config.chunk_batches, partial=PartialFolder(m.partial))
    return _write(m, result)


def _group_key(m: _Member):
    """Members with equal keys run in one vmapped call: one shape (single-task: up to the state and
    action widths), one batch plan, one kind of data (one task, or every task)."""
    cfg, c = m.model.cfg, m.config
    shape = cfg.replace(state_dim=1, act_dim=1) if not cfg.multi else cfg
    return (shape, c.method, c.num_batches, c.batch_size, m.record["subset"], m.task is None and cfg.multi)


def _stack_every_task(datas: list[SegmentData], n_tasks: int) -> SegmentData:
    """Per-member SegmentData stacked over tasks (T, ...) -> (G, T, ...), all padded alike."""
    flat = stack_segment_data([jax.tree.map(lambda x, t=t: x[t], d) for d in datas for t in range(n_tasks)])
    return jax.tree.map(lambda x: x.reshape((len(datas), n_tasks) + x.shape[1:]), flat)


def _run_group(members: list[_Member]) -> list[FisherResult]:
    """One `compute_fishers` call over `members` (one `_group_key`); each member's own result."""
    c = members[0].config
    cfgs = [m.model.cfg for m in members]
    kw = dict(num_batches=c.num_batches, batch_size=c.batch_size, method=c.method, subset=members[0].record["subset"])
    rngs = jnp.stack([jax.random.key(m.config.seed) for m in members])
    stack = lambda ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts)
    if not cfgs[0].multi:
        wide = widest_config(cfgs)
        params = stack([pad_params(wide, m.model.params) for m in members])
        data = stack_segment_data([pad_to(m.data, wide.state_dim, wide.act_dim) for m in members])
        res = compute_fishers(wide, params, data, rngs, act_dims=[cf.act_dim for cf in cfgs], **kw)
        return [unpad_result(cf, jax.tree.map(lambda x, i=i: x[i], res), kw["subset"]) for i, cf in enumerate(cfgs)]
    cfg = cfgs[0]
    params = stack([m.model.params for m in members])
    if members[0].task is None:
        res = compute_fishers(cfg, params, _stack_every_task([m.data for m in members], len(cfg.tasks)), rngs, **kw)
    else:
        data = stack_segment_data([pad_to(m.data, cfg.state_dim, cfg.act_dim) for m in members])
        res = compute_fishers(cfg, params, data, rngs, tasks=[m.task for m in members], **kw)
    return [jax.tree.map(lambda x, i=i: x[i], res) for i in range(len(members))]


def fisher_group_run(runs: list[FisherRun], workdirs: list[str]) -> list[str]:
    """`fisher_run` of each (run, workdir), the same-shaped ones in one vmapped call: the same
    files, metadata and run-config guard, each member equal to its own `fisher_run` up to float
    reassociation. Members whose workdir already holds fisher.json are skipped; every run is
    checked before anything is written. Returns one line per member."""
    runs, workdirs = list(runs), [os.fspath(w) for w in workdirs]
    if len(runs) != len(workdirs):
        raise ValueError(f"workdirs: {len(workdirs)} folders for {len(runs)} runs")
    if len({os.path.abspath(w) for w in workdirs}) != len(workdirs):
        raise ValueError(f"workdirs: repeated folder in {workdirs}")
    lines = {w: f"{w}: done already" for w in workdirs if os.path.exists(os.path.join(w, META_FILE))}
    todo = [(r, w) for r, w in zip(runs, workdirs) if w not in lines]
    for r, w in todo:
        _check(r, w)
    members = [_load(r, w) for r, w in todo]
    # the partial folders that exist are only read (and refused if another run's) before any is written
    for m in sorted(members, key=lambda m: not os.path.exists(os.path.join(m.partial, "run_config.json"))):
        _guard(m)
    groups: dict = {}
    for m in members:
        groups.setdefault(_group_key(m), []).append(m)
    for group in groups.values():
        for m, result in zip(group, _run_group(group)):
            lines[m.workdir] = _write(m, result)
    return [lines[w] for w in workdirs]
