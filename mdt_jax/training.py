"""The training stage: a typed `TrainRun` (configs/train.py's fields) in, a saved model out.

`train_run` builds the DT (single-task, multi-task, or a multi-task model finetuned on one task),
loads each task's data with the normaliser it must use, sets the init (a seed, a checkpoint, a
pretrained trunk, a GPT-2 LM), trains with `train.fit` (resumable), optionally keeps the best
checkpoint on held-out selection episodes, and saves `model/` (and `model_best/`) with the
per-task normalisers. `launch.train` and the study call it; neither hands it a config.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import checkpoint, sharding
from mdt_jax.data import Normalizer, load_task_data
from mdt_jax.fileio import write_json_atomic
from mdt_jax.models.dt import DTConfig
from mdt_jax.fileio import run_config_guard
from mdt_jax.train import TrainConfig, default_sampler, fit, init_params_for_seed


def model_config(model_cfg: Mapping, state_dim: int, act_dim: int, tasks=()) -> DTConfig:
    fields = dict(model_cfg)
    if tasks:
        return DTConfig.multi_task(tasks, **fields)
    return DTConfig(state_dim=state_dim, act_dim=act_dim, **fields)


def train_config(train_cfg: Mapping) -> TrainConfig:
    return TrainConfig(**dict(train_cfg))


def task_dims(task: str) -> tuple[int, int]:
    from mdt_jax.envs import get_task
    t = get_task(task)
    return t.obs_dim, t.act_dim


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """One training run: configs/train.py's fields (see that file for each one's meaning), with
    the task and dataset lists as tuples and `model` / `train` as mappings of DTConfig /
    TrainConfig fields (path-pattern lists comma-separated, as on the command line)."""

    task: tuple[str, ...] = ("hopper",)
    dataset: tuple[str, ...] = ()
    seed: int = 0
    num_steps: int = 100_000
    steps_per_call: int = 100
    checkpoint_every: int = 5_000
    log_every: int = 100
    rtg_scale: float = 1000.0
    mesh_devices: int = 0
    init_from: str = ""
    init_seed: int = -1
    init_trunk_from: str = ""
    save_mode: str = "last"
    eval_every: int = 0
    select_episodes: int = 0
    select_seed: int = 1000
    init_from_lm: str = ""
    lm_timestep_from_wpe: bool = True
    lm_kmeans: int = 0
    lm_kmeans_const: float = 0.1
    lm_tokens: str = ""
    lm_cotrain_weight: float = 1.0
    lm_batch_size: int = 2
    lm_seq_len: int = 1024
    model: Mapping = dataclasses.field(default_factory=dict)
    train: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for f in ("task", "dataset"):
            v = getattr(self, f)
            if isinstance(v, str):
                raise TypeError(f"TrainRun.{f}: a tuple, not a string (the CLI's comma-separated lists are split "
                                "by the adapter)")
            object.__setattr__(self, f, tuple(str(x) for x in v))
        object.__setattr__(self, "model", dict(self.model))
        object.__setattr__(self, "train", dict(self.train))

    def replace(self, *, model: Mapping | None = None, train: Mapping | None = None, **fields) -> "TrainRun":
        """A copy with `fields` set and `model` / `train` entries updated (not replaced)."""
        return dataclasses.replace(self, model=self.model | dict(model or {}), train=self.train | dict(train or {}),
                                   **fields)

    def run_config(self) -> dict:
        """This run in configs/train.py's layout, as the workdir records it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return d | {"task": ",".join(self.task), "dataset": ",".join(self.dataset), "model": dict(self.model),
                    "train": dict(self.train)}


def _load_task_data(task: str, dataset: str, cfg: DTConfig, rtg_scale: float, norm: Normalizer | None = None):
    # dims are the env's: a single-task config is built from them, a multi-task one holds them per task
    return load_task_data(dataset, task, cfg, norm, rtg_scale=rtg_scale)


LM_FIELDS = ("init_from_lm", "lm_timestep_from_wpe", "lm_kmeans", "lm_kmeans_const", "lm_tokens", "lm_cotrain_weight",
             "lm_batch_size", "lm_seq_len")


def _lm_options(config):
    """The LM trunk `config.init_from_lm` names (None when off), after validating every LM field."""
    from mdt_jax import lm as L

    folder, k, tokens = config.init_from_lm, config.lm_kmeans, config.lm_tokens
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"config.lm_kmeans: must be an int >= 0 (0 = off), got {k!r}")
    const, weight = config.lm_kmeans_const, config.lm_cotrain_weight
    for name, v in (("lm_kmeans_const", const), ("lm_cotrain_weight", weight)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
            raise ValueError(f"config.{name}: must be a finite number >= 0, got {v!r}")
    for name in ("lm_batch_size", "lm_seq_len"):
        v = getattr(config, name)
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
    from_wpe = bool(config.lm_timestep_from_wpe)
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


def train_run(config: TrainRun, workdir: str) -> str:
    """Train a DT as `config` says (configs/train.py's fields, typed); returns the model folder.

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

    tasks, datasets = list(config.task), list(config.dataset)
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
    init_seed = config.init_seed
    if not isinstance(init_seed, int) or init_seed < -1:
        raise ValueError(f"config.init_seed: must be an int >= 0 (or -1: from config.seed), got {init_seed!r}")
    if config.init_from_lm and config.init_trunk_from:
        raise ValueError("config.init_trunk_from: cannot be combined with config.init_from_lm (both set the trunk)")
    if config.init_from and config.init_trunk_from:
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
    mesh = sharding.mesh_for(rows, config.mesh_devices)
    if mesh is not None and config.lm_tokens and config.lm_batch_size % mesh.size:
        raise ValueError(f"config.lm_batch_size: {config.lm_batch_size} does not divide over {mesh.size} devices")
    model_dir = os.path.join(workdir, "model")
    on_eval, eval_every = _best_keeper(config, cfg, meta, norms, workdir, tasks)
    # the device count is not part of the run: a run may resume on other devices; the LM fields
    # are left out when off, so workdirs made before they existed still resume
    run_config_guard(workdir, {k: v for k, v in config.run_config().items()
                               if k != "mesh_devices" and not (k in LM_FIELDS and lm is None)})
    if os.path.exists(os.path.join(model_dir, checkpoint.META_FILE)):
        print(f"already trained: {model_dir}")
        return model_dir
    if init_seed >= 0 and lm is None:
        params = init_params_for_seed(cfg, init_seed)
    if config.init_trunk_from:
        base = params if params is not None else init_params_for_seed(cfg, int(config.seed))
        params = trunk_from_checkpoint(cfg, base, config.init_trunk_from)
        meta |= {"init_trunk_from": os.path.abspath(config.init_trunk_from)}
    state = fit(cfg, tcfg, data, num_steps=config.num_steps, workdir=workdir, seed=config.seed, params=params,
                steps_per_call=config.steps_per_call, checkpoint_every=config.checkpoint_every,
                log_every=config.log_every, sample=sample, desc=f"train {','.join(config.task)}", mesh=mesh, aux_loss=aux,
                eval_every=eval_every, on_eval=on_eval)
    meta |= {"dataset": ",".join(config.dataset), "steps": int(state.step),
             "seed": int(config.seed), "init_seed": int(init_seed), "train": dict(config.train)}
    params = jax.device_get(state.params)
    save_mode = config.save_mode
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

    save_mode, every = config.save_mode, int(config.eval_every)
    episodes, seed = int(config.select_episodes), int(config.select_seed)
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
