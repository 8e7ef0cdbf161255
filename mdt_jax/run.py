"""Glue from ml_collections configs to library calls (used by the absl launchers and notebooks)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import checkpoint, sharding
from mdt_jax.behaviour.datasets import (POLICIES_DIR, QUALITIES, behaviour_policy_dir,  # noqa: F401
                                       collect_dataset, resolve_dataset)
from mdt_jax.data import Normalizer, load_task_data
from mdt_jax.fileio import write_json_atomic
from mdt_jax.models.dt import DTConfig
from mdt_jax.train import TrainConfig, default_sampler, fit, init_params_for_seed, run_config_guard


def config_dict(c) -> dict:
    return c.to_dict() if hasattr(c, "to_dict") else dict(c)


def model_config(model_cfg, state_dim: int, act_dim: int, tasks=()) -> DTConfig:
    fields = config_dict(model_cfg)
    if tasks:
        return DTConfig.multi_task(tasks, **fields)
    return DTConfig(state_dim=state_dim, act_dim=act_dim, **fields)


def train_config(train_cfg) -> TrainConfig:
    return TrainConfig(**config_dict(train_cfg))


def task_dims(task: str) -> tuple[int, int]:
    from mdt_jax.envs import get_task
    t = get_task(task)
    return t.obs_dim, t.act_dim


def split_list(value) -> list[str]:
    return [v.strip() for v in str(value or "").split(",") if v.strip()]


def _load_task_data(task: str, dataset: str, cfg: DTConfig, rtg_scale: float, norm: Normalizer | None = None):
    # dims are the env's: a single-task config is built from them, a multi-task one holds them per task
    return load_task_data(dataset, task, cfg, norm, rtg_scale=rtg_scale)


LM_FIELDS = ("init_from_lm", "lm_timestep_from_wpe", "lm_kmeans", "lm_kmeans_const", "lm_tokens", "lm_cotrain_weight",
             "lm_batch_size", "lm_seq_len")


def _lm_options(config):
    """The LM trunk `config.init_from_lm` names (None when off), after validating every LM field."""
    from mdt_jax import lm as L

    get = lambda f, d: config.get(f, d)
    folder, k, tokens = get("init_from_lm", ""), get("lm_kmeans", 0), get("lm_tokens", "")
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"config.lm_kmeans: must be an int >= 0 (0 = off), got {k!r}")
    const, weight = get("lm_kmeans_const", 0.1), get("lm_cotrain_weight", 1.0)
    for name, v in (("lm_kmeans_const", const), ("lm_cotrain_weight", weight)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
            raise ValueError(f"config.{name}: must be a finite number >= 0, got {v!r}")
    for name in ("lm_batch_size", "lm_seq_len"):
        v = get(name, 2)
        if not isinstance(v, int) or isinstance(v, bool) or v < (2 if name == "lm_seq_len" else 1):
            raise ValueError(f"config.{name}: must be an int >= {2 if name == 'lm_seq_len' else 1}, got {v!r}")
    if not folder:
        for name, v in (("lm_kmeans", k), ("lm_tokens", tokens)):
            if v:
                raise ValueError(f"config.{name}: needs config.init_from_lm (the LM whose embeddings it uses)")
        return None
    if config.init_from:
        raise ValueError("config.init_from_lm: cannot be combined with config.init_from (both set the params)")
    try:
        lm = L.import_lm(folder)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"config.init_from_lm: {e}") from None
    if k > lm.wte.shape[0]:
        raise ValueError(f"config.lm_kmeans: {k} clusters but the LM's vocabulary has {lm.wte.shape[0]} tokens")
    return lm


def _lm_setup(config, cfg, lm, params, init_seed: int, sample, data, tcfg):
    """(params, sample, data, aux_loss, metadata) for a run that starts from `lm`."""
    from mdt_jax import lm as L
    from mdt_jax.train import default_sampler

    try:
        L.check_fits(cfg, lm)
    except ValueError as e:
        raise ValueError(f"config.model / config.init_from_lm: {e}") from None
    from_wpe = bool(config.get("lm_timestep_from_wpe", True))
    seq_len, batch = config.lm_seq_len, config.lm_batch_size
    weight = float(config.lm_cotrain_weight) if config.lm_tokens else 0.0
    tokens = None
    if config.lm_tokens:
        positions = cfg.max_ep_len if from_wpe else lm.wpe.shape[0]
        if seq_len > positions:
            raise ValueError(f"config.lm_seq_len: {seq_len} tokens but only {positions} positions "
                             f"({'config.model.max_ep_len' if from_wpe else 'the LM wpe'})")
        try:
            tokens = L.load_tokens(config.lm_tokens, lm.wte.shape[0])
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"config.lm_tokens: {e}") from None
        if tokens.size < seq_len:
            raise ValueError(f"config.lm_seq_len: {seq_len} exceeds the {tokens.size} tokens of {config.lm_tokens}")
    if params is None:
        params = init_params_for_seed(cfg, init_seed if init_seed >= 0 else int(config.seed))
    params = L.init_trunk_from_lm(cfg, params, lm, timestep_from_wpe=from_wpe)
    centroids = L.lm_centroids(lm.wte, config.lm_kmeans, seed=0) if config.lm_kmeans else None
    if tokens is not None:
        base = sample or default_sampler(cfg, tcfg)
        sample = lambda d, key: base(d[0], key) | {
            "lm_tokens": L.sample_token_windows(d[1], jax.random.fold_in(key, 7), batch, seq_len)}
        data = (data, jnp.asarray(tokens))
    aux = None
    if centroids is not None or weight > 0:
        aux = L.make_aux_loss(cfg, lm, centroids=centroids, kmeans_const=float(config.lm_kmeans_const),
                              cotrain_weight=weight, timestep_from_wpe=from_wpe)
    meta = L.lm_metadata(lm) | {"timestep_from_wpe": from_wpe, "kmeans": int(config.lm_kmeans),
                                "kmeans_const": float(config.lm_kmeans_const), "kmeans_seed": 0,
                                "kmeans_horizon": L.KMEANS_HORIZON,
                                "tokens": os.path.abspath(config.lm_tokens) if config.lm_tokens else "",
                                "cotrain_weight": weight, "lm_batch_size": batch, "lm_seq_len": seq_len}
    return params, sample, data, aux, meta


def train_from_config(config, workdir: str) -> str:
    """Train a DT as `config` (configs/train.py) says; returns the model folder.

    - one task and dataset: a single-task DT;
    - comma-separated tasks and datasets (same order): one multi-task DT (shared trunk, per-task
      heads, `batch_size` samples per task, losses summed over tasks);
    - one task with `init_from` a multi-task checkpoint: that model finetuned on the task (its
      normalisation comes from the checkpoint).

    With `init_from`, the model config is the checkpoint's and `config.model` is not used. With
    `init_from_lm`, the trunk starts from that GPT-2 LM (mdt_jax.lm), optionally with the k-means
    cosine loss (`lm_kmeans`) and LM co-training (`lm_tokens`); the model's metadata records it
    under ``init_from_lm``.

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
    lm = _lm_options(config)
    init_cfg = params = None
    init_seed = config.get("init_seed", -1)
    if not isinstance(init_seed, int) or init_seed < -1:
        raise ValueError(f"config.init_seed: must be an int >= 0 (or -1: from config.seed), got {init_seed!r}")
    if config.get("init_from_lm", "") and config.get("init_trunk_from", ""):
        raise ValueError("config.init_trunk_from: cannot be combined with config.init_from_lm (both set the trunk)")
    if config.init_from and config.get("init_trunk_from", ""):
        raise ValueError("config.init_trunk_from: cannot be combined with config.init_from (the params come from it)")
    if config.init_from:
        if init_seed >= 0:
            raise ValueError("config.init_seed: cannot be combined with config.init_from (the params come from it)")
        init = checkpoint.load(config.init_from)
        init_cfg, params = init.cfg, init.params
    sample = None
    if init_cfg is not None and init_cfg.multi and len(tasks) == 1:  # finetune a multi-task model on one task
        cfg, task = init_cfg, tasks[0]
        t = cfg.task_index(task)
        # the finetune keeps the checkpoint's normalisation, with this run's rtg_scale
        init.norm(task)
        norms = {t: dataclasses.replace(n, rtg_scale=float(config.rtg_scale)) for t, n in init.norms.items()}
        one = norms[task].apply_to(_load_task_data(task, datasets[0], cfg, config.rtg_scale))
        data = pad_to(one, cfg.state_dim, cfg.act_dim)
        sample = lambda d, k: sample_batch(d, k, tcfg.batch_size) | {
            "task_id": jnp.full((tcfg.batch_size,), t, jnp.int32)}
        meta = {"kind": "multi_task_finetune", "task": task, "finetuned_from": os.path.abspath(config.init_from),
                "tasks": list(cfg.task_names)}
    elif len(tasks) > 1:
        cfg = init_cfg or model_config(config.model, 0, 0, tasks=[(t, *task_dims(t)) for t in tasks])
        if cfg.task_names != tuple(tasks):
            raise ValueError(f"config.init_from: {config.init_from} is a model for tasks {cfg.task_names}, "
                             f"not {tuple(tasks)}")
        datas = [_load_task_data(task, path, cfg, config.rtg_scale) for task, path in zip(tasks, datasets)]
        data = stack_segment_data(datas)
        norms = {t: Normalizer.of(d) for t, d in zip(tasks, datas)}
        meta = {"kind": "multi_task", "tasks": tasks}
    else:
        state_dim, act_dim = task_dims(tasks[0])
        cfg = init_cfg if init_cfg is not None else model_config(config.model, state_dim, act_dim)
        if (cfg.state_dim, cfg.act_dim) != (state_dim, act_dim):
            raise ValueError(f"config.init_from: {config.init_from} is a model for (state_dim, act_dim) = "
                             f"{(cfg.state_dim, cfg.act_dim)}, but task {tasks[0]!r} needs {(state_dim, act_dim)}")
        data = _load_task_data(tasks[0], datasets[0], cfg, config.rtg_scale)
        norms = {tasks[0]: Normalizer.of(data)}
        meta = {"kind": "single_task", "task": tasks[0]}
    aux = None
    if lm is not None:
        params, sample, data, aux, meta["init_from_lm"] = _lm_setup(config, cfg, lm, params, init_seed, sample, data,
                                                                    tcfg)
    rows = jax.eval_shape(sample or default_sampler(cfg, tcfg), data, jax.random.key(0))["mask"].shape[0]
    mesh = sharding.mesh_for(rows, config.get("mesh_devices", 0))
    if mesh is not None and config.get("lm_tokens", "") and config.lm_batch_size % mesh.size:
        raise ValueError(f"config.lm_batch_size: {config.lm_batch_size} does not divide over {mesh.size} devices")
    model_dir = os.path.join(workdir, "model")
    on_eval, eval_every = _best_keeper(config, cfg, meta, norms, workdir, tasks)
    # the device count is not part of the run: a run may resume on other devices; the LM fields
    # are left out when off, so workdirs made before they existed still resume
    run_config_guard(workdir, {k: v for k, v in config_dict(config).items()
                               if k != "mesh_devices" and not (k in LM_FIELDS and lm is None)})
    if os.path.exists(os.path.join(model_dir, checkpoint.META_FILE)):
        print(f"already trained: {model_dir}")
        return model_dir
    if init_seed >= 0 and lm is None:
        params = init_params_for_seed(cfg, init_seed)
    if config.get("init_trunk_from", ""):
        base = params if params is not None else init_params_for_seed(cfg, int(config.seed))
        params = trunk_from_checkpoint(cfg, base, config.init_trunk_from)
        meta |= {"init_trunk_from": os.path.abspath(config.init_trunk_from)}
    state = fit(cfg, tcfg, data, num_steps=config.num_steps, workdir=workdir, seed=config.seed, params=params,
                steps_per_call=config.steps_per_call, checkpoint_every=config.checkpoint_every,
                log_every=config.log_every, sample=sample, desc=f"train {config.task}", mesh=mesh, aux_loss=aux,
                eval_every=eval_every, on_eval=on_eval)
    meta |= {"dataset": config.dataset, "steps": int(state.step),
             "seed": int(config.seed), "init_seed": int(init_seed), "train": config_dict(config.train)}
    params = jax.device_get(state.params)
    save_mode = config.get("save_mode", "last")
    if jax.process_index() == 0:  # across hosts, process 0 writes the model and the others wait
        if save_mode in ("best", "both"):
            best = _read_best(workdir)
            bmeta = meta | {"checkpoint_mode": "best", "selection": best["selection"], "steps": best["step"]}
            best_dir = checkpoint.save(os.path.join(workdir, "model_best"), best_params(workdir, cfg), cfg, bmeta,
                                       norms=norms)
        if save_mode in ("last", "both"):
            model_dir = checkpoint.save(model_dir, params, cfg, meta | {"checkpoint_mode": "last"}, norms=norms)
        else:
            model_dir = best_dir
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("mdt_jax model saved")
    return model_dir


TRUNK_FIELDS = ("hidden_size", "n_layer", "n_head", "inner_dim", "activation", "layer_norm_eps")


def trunk_from_checkpoint(cfg: DTConfig, params: dict, path: str) -> dict:
    """`params` with the trunk (the blocks and ln_f) of the DT checkpoint at `path`: a pretrained
    trunk (e.g. `reproduce`'s multi-task DT on data the target DTs never see) as a common init."""
    src_cfg, src, _ = checkpoint.load(path)
    bad = [f"{f}: {getattr(src_cfg, f)!r} in {path}, {getattr(cfg, f)!r} here" for f in TRUNK_FIELDS
           if getattr(src_cfg, f) != getattr(cfg, f)]
    if bad:
        raise ValueError("config.init_trunk_from: the trunk does not fit this model (" + "; ".join(bad) + ")")
    return params | {k: v for k, v in src.items() if k.startswith("block_") or k == "ln_f"}


SAVE_MODES = ("last", "best", "both")


def _best_keeper(config, cfg: DTConfig, meta: dict, norms: dict, workdir: str, tasks: list[str]):
    """(on_eval, eval_every) for `fit`: keep the params with the best mean normalised score on the
    selection episodes in WORKDIR/best (orbax) + best.json, resumable; (None, 0) for save_mode last."""
    from mdt_jax import envs, evaluate as ev

    save_mode, every = config.get("save_mode", "last"), int(config.get("eval_every", 0))
    episodes, seed = int(config.get("select_episodes", 0)), int(config.get("select_seed", 1000))
    if save_mode not in SAVE_MODES:
        raise ValueError(f"config.save_mode: unknown {save_mode!r}; choose from {SAVE_MODES}")
    if every < 0 or episodes < 0:
        raise ValueError("config.eval_every and config.select_episodes must be >= 0")
    if every and not episodes:
        raise ValueError("config.eval_every: evaluating during training needs selection episodes "
                         "(config.select_episodes > 0, reset seed config.select_seed)")
    if save_mode != "last" and not every:
        raise ValueError(f"config.save_mode={save_mode!r} needs config.eval_every > 0 and config.select_episodes > 0")
    if save_mode == "last":
        return None, 0
    if cfg.multi:
        eval_tasks = [tasks[0]] if meta.get("kind") == "multi_task_finetune" else list(cfg.task_names)
    else:
        eval_tasks = tasks[:1]
    stats = {t: ev.TaskStats.of(dataclasses.replace(norms[t], rtg_scale=float(config.rtg_scale)), envs.target_return(t))
             for t in eval_tasks}
    from mdt_jax.fileio import orbax_writer, write_dir_atomic

    def on_eval(step, params):
        params = jax.device_get(params)
        res = ev.evaluate(cfg, params, eval_tasks, stats, episodes=episodes, max_steps=1000, seed=seed)
        score = float(np.mean([r.summary()["normalized"] for r in res]))
        best = _read_best(workdir)
        if best is None or score > best["score"]:
            write_dir_atomic(os.path.join(workdir, "best"), {"params": orbax_writer(params)}, overwrite=True)
            write_json_atomic(os.path.join(workdir, "best.json"), {
                "step": int(step), "score": score, "selection": {
                    "episodes": episodes, "reset_seed": seed, "tasks": eval_tasks, "score": "mean normalized"}})
        print(f"eval step {step}: selection score {score:.2f} (best {max(score, best['score']) if best else score:.2f})",
              flush=True)

    return on_eval, every


def _read_best(workdir: str) -> dict | None:
    path = os.path.join(workdir, "best.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def best_params(workdir: str, cfg: DTConfig) -> dict:
    from mdt_jax.fileio import orbax_read
    from mdt_jax.models.dt import param_shapes

    target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), param_shapes(cfg))
    return orbax_read(os.path.join(workdir, "best", "params"), ValueError, "best params", target=target)


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
    model = checkpoint.load(config.checkpoint)
    cfg, params = model.cfg, model.params
    if not model.norms:
        raise ValueError(f"config.checkpoint: {config.checkpoint} has no normalisation stats "
                         "(not a trained DT policy)")
    own = list(cfg.task_names) if cfg.multi else [model.metadata.get("task")]
    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()] or own
    for t in tasks:
        envs.get_task(t)
    if config.target_return < 0:
        raise ValueError(f"config.target_return: must be >= 0, got {config.target_return}")
    stats = {t: ev.TaskStats.of(_norm(model, t), config.target_return or envs.target_return(t)) for t in tasks}
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


def _norm(model: checkpoint.Model, task: str):
    try:
        return model.norm(task)
    except ValueError as e:
        raise ValueError(f"config.checkpoint: {e}") from None


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
                              cfg=brax_sac.BraxSACConfig(**config_dict(config.brax)), seed=int(config.seed),
                              save_every=int(config.save_every), eval_episodes=int(config.eval_episodes),
                              command=command, log=lambda s: print(s, flush=True))
    from mdt_jax.behaviour import sac

    cfg = sac.SACConfig(**config_dict(config.sac))
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
