"""The adapters: each `*_from_config` turns an ml_collections config (configs/*.py) into typed
objects and makes one library call; the launchers (launch/) and notebooks call them. Nothing below
this module reads a ConfigDict."""
from __future__ import annotations

import dataclasses
import json
import os

import jax

from mdt_jax.behaviour.datasets import (POLICIES_DIR, QUALITIES, behaviour_policy_dir,  # noqa: F401
                                       collect_dataset, resolve_dataset)
from mdt_jax.fileio import write_json_atomic
from mdt_jax.fileio import run_config_guard  # noqa: F401  (re-exported)
from mdt_jax.results import results_table  # noqa: F401  (re-exported)
from mdt_jax.training import (TrainRun, model_config, task_dims, train_config, train_run,  # noqa: F401
                              trunk_from_checkpoint)


def cli_value(v):
    """A config value in the command line's layout, the one workdirs record a run in: a tuple
    (the configs' lists) comma-joined, nested dicts converted entry by entry."""
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    if isinstance(v, dict):
        return {k: cli_value(x) for k, x in v.items()}
    return v


def config_dict(c) -> dict:
    """A ConfigDict (or mapping) as a plain dict in the command line's layout (`cli_value`)."""
    return cli_value(c.to_dict() if hasattr(c, "to_dict") else dict(c))


def split_list(value) -> list[str]:
    """The items of a config list: a tuple (the configs' form; `--config.tasks=a,b,c` gives one
    ('a,b,c',) element, split here) or a comma-separated string."""
    items = value if isinstance(value, (tuple, list)) else ([] if value is None else [value])
    return [v.strip() for x in items for v in str(x).split(",") if v.strip()]


def train_run_spec(config, *, model: dict | None = None, train: dict | None = None, **fields) -> TrainRun:
    """configs/train.py's ConfigDict as a typed `training.TrainRun`; `fields` (typed) set over it,
    `model` / `train` entries updated (e.g. by the study)."""
    d = config_dict(config)
    unknown = set(d) - {f.name for f in dataclasses.fields(TrainRun)}
    if unknown:
        raise ValueError(f"config: unknown training fields {sorted(unknown)}")
    d["task"], d["dataset"] = tuple(split_list(d["task"])), tuple(split_list(d["dataset"]))
    return TrainRun(**d).replace(model=model, train=train, **fields)


def train_from_config(config, workdir: str) -> str:
    """Run configs/train.py (`training.train_run`); returns the model folder."""
    return train_run(train_run_spec(config), workdir)


def fisher_from_config(config, workdir: str) -> str:
    """Run configs/fisher.py (`fisher_stage.fisher_run`)."""
    from mdt_jax.fisher_stage import FisherRun, fisher_run

    return fisher_run(FisherRun(**(config_dict(config) | {"dataset": tuple(split_list(config.dataset))})), workdir)


def search_from_config(config, workdir: str) -> str:
    """Run configs/search.py (`search.search_run`)."""
    from mdt_jax.search import SearchEval, SearchSpec, search_run

    d = config_dict(config)
    d |= {"checkpoints": tuple(split_list(d["checkpoints"])), "fishers": tuple(split_list(d["fishers"])),
          "eval": SearchEval(**d["eval"])}
    return search_run(SearchSpec(**d), workdir)


def reference_returns_from_config(config, workdir: str) -> str:
    """Run configs/reference_returns.py (`behaviour.reference.write_reference_returns`)."""
    from mdt_jax.behaviour.reference import write_reference_returns

    return write_reference_returns(workdir, split_list(config.tasks), episodes=config.episodes, seed=config.seed,
                                   max_steps=config.max_steps, overwrite=bool(config.overwrite))


def gram_from_config(config, workdir: str) -> str:
    """Run configs/gram.py (`regmean.gram_run`)."""
    from mdt_jax.regmean import GramRun, gram_run

    return gram_run(GramRun(**(config_dict(config) | {"dataset": tuple(split_list(config.dataset))})), workdir)


def evaluate_from_config(config, workdir: str) -> str:
    """Run configs/evaluate.py (`evaluate.evaluate_checkpoint`): write `workdir/eval.json`; returns the table."""
    from mdt_jax import evaluate as ev

    for f in ("episodes", "max_steps"):
        if config[f] <= 0:
            raise ValueError(f"config.{f}: must be a positive int, got {config[f]}")
    report = ev.evaluate_checkpoint(config.checkpoint, split_list(config.tasks), episodes=config.episodes,
                                    max_steps=config.max_steps, seed=config.seed, executor=config.executor,
                                    target_return=config.target_return)
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, "eval.json"), report)
    nan = sum(r["nan_action_steps"] for r in report["results"])
    warn = f"\nwarning: {nan} steps had non-finite actions (replaced by 0)" if nan else ""
    return results_table(report["results"]) + warn


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


def merge_spec(config, **overrides):
    """configs/merge.py's ConfigDict as a typed `pipelines.MergeSpec` (`overrides`: typed fields
    set over it, e.g. by the study)."""
    from mdt_jax import evaluate as ev
    from mdt_jax.pipelines import MergeSpec

    d = config_dict(config)
    for f in ("checkpoints", "fishers", "grams"):
        d[f] = tuple(split_list(d[f]))
    for f in ("weights", "lerp_ps", "ta_lams", "ties_ks", "ties_lams", "dare_ps"):
        try:
            d[f] = tuple(_floats(d[f]))
        except ValueError as e:
            raise ValueError(f"config.{f}: {e}") from None
    d["eval"] = ev.EvalSpec(**d["eval"])
    return MergeSpec(**(d | overrides))


def merge_from_config(config, workdir: str) -> str:
    """Run configs/merge.py: P1, P2 or P3 over trained checkpoints; evaluate; write merge.json."""
    from mdt_jax.pipelines import merge_stage

    result = merge_stage(merge_spec(config), workdir)
    return results_table([r.to_dict() for r in result.rows],
                         keys=("model", "coefficients", "task", "episodes", "return_mean", "return_std",
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
                              cfg=brax_sac.BraxSACConfig(**config.brax.to_dict()), seed=int(config.seed),
                              save_every=int(config.save_every), eval_episodes=int(config.eval_episodes),
                              command=command, log=lambda s: print(s, flush=True))
    from mdt_jax.behaviour import sac

    cfg = sac.SACConfig(**config.sac.to_dict())  # typed fields, tuples kept (hidden)
    return sac.train(config.task, workdir, env_steps=int(config.env_steps), cfg=cfg, seed=int(config.seed),
                     save_every=int(config.save_every), eval_every=int(config.eval_every),
                     eval_episodes=int(config.eval_episodes), stop_return=float(config.stop_return),
                     command=command, log=lambda s: print(s, flush=True))


def select_behaviour_from_config(config, workdir: str) -> str:
    """Run configs/select_behaviour.py (`behaviour.select.select_behaviour`)."""
    from mdt_jax.behaviour.select import select_behaviour

    fields = ("episodes", "seed", "medium_fraction", "medium_min", "medium_max", "out", "overwrite")
    return json.dumps(select_behaviour(config.task, workdir, **{f: config[f] for f in fields}), indent=1)
