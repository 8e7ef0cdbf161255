"""Datasets the project makes itself, by quality, and the `generated:` dataset spec.

`collect_dataset(task, quality, transitions, path)` makes (or reuses) a D4RL-layout HDF5 from a
uniform-random policy or the committed behaviour policies. `resolve_dataset(spec)` turns
``generated:<task>-<quality>[@<transitions>]`` (e.g. ``generated:hopper-medium``, 1M transitions
by default) into the path of a cached file, making it first if it is missing, so any command
that takes a dataset can take one made from the committed policies; other specs pass through.
The cache is ``$MDT_JAX_DATA`` (default ``~/.cache/mdt_jax/datasets``).
"""
from __future__ import annotations

import os
import re

import numpy as np

from mdt_jax import envs

QUALITIES = ("random", "medium", "expert", "medium-expert")
POLICIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "policies")  # committed, shipped
GENERATED = re.compile(r"^generated:(?P<task>[a-z0-9]+)-(?P<quality>[a-z-]+?)(@(?P<n>[0-9_]+))?$")


def resolve_dataset(spec: str) -> str:
    """The path behind a dataset spec; `generated:` specs are made (once) in the cache."""
    if not isinstance(spec, str) or not spec.startswith("generated:"):
        return spec
    m = GENERATED.match(spec)
    if not m:
        raise ValueError(f"config.dataset: {spec!r} is not generated:<task>-<quality>[@<transitions>] "
                         f"(qualities {QUALITIES})")
    task, quality = m["task"], m["quality"]
    envs.get_task(task)
    if quality not in QUALITIES:
        raise ValueError(f"config.dataset: unknown quality {quality!r} in {spec!r}; choose one of {QUALITIES}")
    n = int(m["n"] or 1_000_000)
    if n <= 0:
        raise ValueError(f"config.dataset: {spec!r} asks for no transitions")
    root = os.environ.get("MDT_JAX_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "mdt_jax", "datasets")
    return collect_dataset(task, quality, n, os.path.join(root, f"{task}-{quality}-{n}.hdf5"))


def collect_dataset(task: str, quality: str, transitions: int, path: str, *, seed: int = 0,
                    num_envs: int = 64, slot_steps: int = 4000) -> str:
    """Make (or reuse, if `path` exists) a dataset of `quality` for `task`; returns the path.

    The NumPy actor runs with one BLAS thread: OpenBLAS's multi-threaded sgemm sums in another
    order, so without the limit the same seed gave other actions (other bytes) on another thread
    count. See `_collect_dataset` for the qualities and the resumable waves."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _collect_dataset(task, quality, transitions, path, seed=seed, num_envs=num_envs,
                                slot_steps=slot_steps)


def _collect_dataset(task: str, quality: str, transitions: int, path: str, *, seed: int = 0,
                    num_envs: int = 64, slot_steps: int = 4000) -> str:
    """Make (or reuse, if `path` exists) a dataset of `quality` for `task`; returns the path.

    random: uniform actions in [-1, 1]. medium / expert: the committed behaviour policies
    (`mdt_jax/behaviour/policies/<task>/<quality>`), sampled stochastically as D4RL's data was.
    medium-expert: the medium and the expert datasets of `transitions` each, concatenated (as
    D4RL's), made beside `path` (and reused) when missing. Finished waves are kept beside the
    target (`.<name>.waves/`) until the file is written, so a killed run resumes where it stopped
    and writes the same bytes.
    """
    import shutil

    from tqdm import tqdm

    from mdt_jax.behaviour import policy as pol
    from mdt_jax.behaviour.collect import collect, uniform_policy
    from mdt_jax.data import OfflineDataset, load_d4rl_hdf5, save_d4rl_hdf5

    if quality not in QUALITIES:
        raise ValueError(f"config.quality: unknown {quality!r}; choose one of {QUALITIES}")
    if os.path.exists(path):
        return path
    parent, name = os.path.split(os.path.abspath(path))
    if quality == "medium-expert":
        parts = [load_d4rl_hdf5(collect_dataset(task, q, transitions, os.path.join(parent, f"{task}-{q}.hdf5"),
                                                seed=seed + i, num_envs=num_envs, slot_steps=slot_steps))
                 for i, q in enumerate(("medium", "expert"))]
        meta = {"task": task, "quality": quality, "seed": seed, "transitions": 2 * transitions,
                "parts": [p.metadata for p in parts],
                "return_mean": float(np.mean([p.metadata["return_mean"] for p in parts]))}
        fields = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
        save_d4rl_hdf5(OfflineDataset(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in fields},
                                      metadata=meta), path)
        return path
    if quality == "random":
        policy, about = uniform_policy(envs.get_task(task).act_dim), {"policy": "uniform_random"}
    else:
        pdir = behaviour_policy_dir(task, quality)
        pcfg, params, pmeta = pol.load_policy(pdir)
        if pcfg.task != task:
            raise ValueError(f"{pdir}: a policy for {pcfg.task!r}, not {task!r}")
        policy = pol.numpy_policy(params, std=pcfg.std)
        about = {"policy": f"sac:{task}/{quality}", "policy_env_steps": pmeta.get("env_steps"),
                 "policy_eval_return": pmeta.get("eval_return_mean")}
    waves = os.path.join(parent, f".{name}.waves")
    with tqdm(total=transitions, unit="transition", unit_scale=True, desc=f"collect {task}-{quality}") as bar:
        ds = collect(task, policy, transitions, num_envs=num_envs, seed=seed, progress=bar.update, slot_steps=slot_steps,
                     metadata=about | {"quality": quality}, wave_dir=waves)
    save_d4rl_hdf5(ds, path)
    shutil.rmtree(waves, ignore_errors=True)
    return path


def behaviour_policy_dir(task: str, quality: str) -> str:
    """The committed behaviour policy for (task, quality), shipped inside the package."""
    d = os.path.join(POLICIES_DIR, task, quality)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no committed {quality!r} behaviour policy for {task!r} (looked in {d}); "
                                "train one with launch.train_behaviour and pick it with launch.select_behaviour")
    return d




def _register() -> None:
    from mdt_jax.data import register_resolver

    register_resolver("generated:", resolve_dataset)


_register()
