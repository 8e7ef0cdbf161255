"""The training stage: a typed `TrainRun` (configs/train.py's fields) in, a saved model out.

`train_run` builds the DT (single-task, multi-task, or a multi-task model finetuned on one task),
loads each task's data with the normaliser it must use, sets the init (a seed, a checkpoint, a
pretrained trunk, a GPT-2 LM), trains with `train.fit` (resumable), optionally keeps the best
checkpoint on held-out selection episodes, and saves `model/` (and `model_best/`) with the
per-task normalisers. `launch.train` and the study call it; neither hands it a config.

`train_group` trains several same-shaped runs in one vmapped program (the study's grouped
training, `mdt_jax.reproduce.train_groups`): single-task DTs of different tasks padded to the
widest state and action, multi-task DTs, or multi-task finetunes; each member is saved as
`train_run` would save it, and the group resumes from one checkpoint of the stacked state.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import checkpoint, sharding
from mdt_jax.data import Normalizer, load_task_data, pad_stack
from mdt_jax.fileio import write_json_atomic
from mdt_jax.models.dt import DTConfig
from mdt_jax.fileio import check_run_config, run_config_guard
from mdt_jax.train import TrainConfig, default_sampler, fit, init_params_for_seed, init_state


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


def _check_run(config: TrainRun) -> tuple[TrainConfig, object]:
    """(TrainConfig, the LM of `init_from_lm` or None) after validating the run's fields."""
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
    init_seed = config.init_seed
    if not isinstance(init_seed, int) or init_seed < -1:
        raise ValueError(f"config.init_seed: must be an int >= 0 (or -1: from config.seed), got {init_seed!r}")
    if config.init_from_lm and config.init_trunk_from:
        raise ValueError("config.init_trunk_from: cannot be combined with config.init_from_lm (both set the trunk)")
    if config.init_from and config.init_trunk_from:
        raise ValueError("config.init_trunk_from: cannot be combined with config.init_from (the params come from it)")
    if config.init_from and init_seed >= 0:
        raise ValueError("config.init_seed: cannot be combined with config.init_from (the params come from it)")
    return tcfg, lm


def _run_kind(config: TrainRun, init_cfg: DTConfig | None) -> str:
    """What `config` trains: 'multi_task_finetune', 'multi_task' or 'single_task' (`train_run`)."""
    if init_cfg is not None and init_cfg.multi and len(config.task) == 1:
        return "multi_task_finetune"
    return "multi_task" if len(config.task) > 1 else "single_task"


def _task_setup(config: TrainRun, tcfg: TrainConfig, init, load=_load_task_data):
    """(cfg, data, norms, meta, sample) of a run: the model config (the checkpoint's with
    `init_from`), its training data normalised as the run must see it, the per-task normalisers
    the model is saved with, the metadata's kind fields, and the sampler (None: the default).
    `load(task, dataset, cfg, rtg_scale)` reads one task's data (a group reads each once)."""
    from mdt_jax.data import pad_to, sample_batch, stack_segment_data

    tasks, datasets = list(config.task), list(config.dataset)
    init_cfg = init.cfg if init is not None else None
    sample = None
    kind = _run_kind(config, init_cfg)
    if kind == "multi_task_finetune":  # finetune a multi-task model on one task
        cfg, task = init_cfg, tasks[0]
        t = cfg.task_index(task)
        # the finetune keeps the checkpoint's normalisation, with this run's rtg_scale
        init.norm(task)
        norms = {t: dataclasses.replace(n, rtg_scale=float(config.rtg_scale)) for t, n in init.norms.items()}
        one = norms[task].apply_to(load(task, datasets[0], cfg, config.rtg_scale))
        data = pad_to(one, cfg.state_dim, cfg.act_dim)
        sample = lambda d, k: sample_batch(d, k, tcfg.batch_size) | {
            "task_id": jnp.full((tcfg.batch_size,), t, jnp.int32)}
        meta = {"kind": "multi_task_finetune", "task": task, "finetuned_from": os.path.abspath(config.init_from),
                "tasks": list(cfg.task_names)}
    elif kind == "multi_task":
        cfg = init_cfg or model_config(config.model, 0, 0, tasks=[(t, *task_dims(t)) for t in tasks])
        if cfg.task_names != tuple(tasks):
            raise ValueError(f"config.init_from: {config.init_from} is a model for tasks {cfg.task_names}, "
                             f"not {tuple(tasks)}")
        datas = [load(task, path, cfg, config.rtg_scale) for task, path in zip(tasks, datasets)]
        data = stack_segment_data(datas)
        norms = {t: Normalizer.of(d) for t, d in zip(tasks, datas)}
        meta = {"kind": "multi_task", "tasks": tasks}
    else:
        cfg = _single_task_cfg(config, init_cfg)
        data = load(tasks[0], datasets[0], cfg, config.rtg_scale)
        norms = {tasks[0]: Normalizer.of(data)}
        meta = {"kind": "single_task", "task": tasks[0]}
    return cfg, data, norms, meta, sample


def _single_task_cfg(config: TrainRun, init_cfg: DTConfig | None) -> DTConfig:
    state_dim, act_dim = task_dims(config.task[0])
    cfg = init_cfg if init_cfg is not None else model_config(config.model, state_dim, act_dim)
    if (cfg.state_dim, cfg.act_dim) != (state_dim, act_dim):
        raise ValueError(f"config.init_from: {config.init_from} is a model for (state_dim, act_dim) = "
                         f"{(cfg.state_dim, cfg.act_dim)}, but task {config.task[0]!r} needs {(state_dim, act_dim)}")
    return cfg


def _start_params(config: TrainRun, cfg: DTConfig, params, lm=None):
    """The params training starts from (None: `init_state`'s from `config.seed`), as `train_run`
    sets them after the LM setup: the init seed, then the trunk of `init_trunk_from`."""
    if config.init_seed >= 0 and lm is None:
        params = init_params_for_seed(cfg, config.init_seed)
    if config.init_trunk_from:
        base = params if params is not None else init_params_for_seed(cfg, int(config.seed))
        params = trunk_from_checkpoint(cfg, base, config.init_trunk_from)
    return params


def _trunk_meta(config: TrainRun) -> dict:
    return {"init_trunk_from": os.path.abspath(config.init_trunk_from)} if config.init_trunk_from else {}


def _member_meta(config: TrainRun, meta: dict, steps: int) -> dict:
    """The saved model's metadata (`train_run`'s keys) for `steps` trained steps."""
    return meta | {"dataset": ",".join(config.dataset), "steps": int(steps), "seed": int(config.seed),
                   "init_seed": int(config.init_seed), "train": dict(config.train)}


def _guarded_run_config(config: TrainRun, lm=None) -> dict:
    # the device count is not part of the run: a run may resume on other devices; the LM fields
    # are left out when off, so workdirs made before they existed still resume
    return {k: v for k, v in config.run_config().items()
            if k != "mesh_devices" and not (k in LM_FIELDS and lm is None)}


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
    tcfg, lm = _check_run(config)
    init = checkpoint.load(config.init_from) if config.init_from else None
    cfg, data, norms, meta, sample = _task_setup(config, tcfg, init)
    params = init.params if init is not None else None
    init_seed = config.init_seed
    aux = None
    if lm is not None:
        params, sample, data, aux, meta["init_from_lm"] = _lm_setup(config, cfg, lm, params, init_seed, sample, data,
                                                                    tcfg)
    rows = jax.eval_shape(sample or default_sampler(cfg, tcfg), data, jax.random.key(0))["mask"].shape[0]
    mesh = sharding.mesh_for(rows, config.mesh_devices)
    if mesh is not None and config.lm_tokens and config.lm_batch_size % mesh.size:
        raise ValueError(f"config.lm_batch_size: {config.lm_batch_size} does not divide over {mesh.size} devices")
    model_dir = os.path.join(workdir, "model")
    on_eval, eval_every = _best_keeper(config, cfg, meta, norms, workdir, list(config.task))
    run_config_guard(workdir, _guarded_run_config(config, lm))
    if os.path.exists(os.path.join(model_dir, checkpoint.META_FILE)):
        print(f"already trained: {model_dir}")
        return model_dir
    params = _start_params(config, cfg, params, lm)
    meta |= _trunk_meta(config)
    state = fit(cfg, tcfg, data, num_steps=config.num_steps, workdir=workdir, seed=config.seed, params=params,
                steps_per_call=config.steps_per_call, checkpoint_every=config.checkpoint_every,
                log_every=config.log_every, sample=sample, desc=f"train {','.join(config.task)}", mesh=mesh, aux_loss=aux,
                eval_every=eval_every, on_eval=on_eval)
    meta = _member_meta(config, meta, int(state.step))
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


# ----------------------------------------------------------------------------------------------
# Grouped training: same-shaped runs trained in one vmapped program (`train_group`)
# ----------------------------------------------------------------------------------------------

GROUP_FREE = ("task", "dataset", "seed", "init_seed", "init_from", "init_trunk_from")
GROUP_KINDS = ("single_task", "multi_task", "multi_task_finetune")
MEMBERS_FILE = "members.json"
DEVICE_MEMORY_FRACTION = 0.8  # of an accelerator's allocator limit (memory_stats()['bytes_limit'])
HOST_MEMORY_FRACTION = 0.5    # of the machine's physical RAM, on CPU


def group_sample(kind: str, batch_size: int) -> Callable:
    """One member's `sample(data, key) -> batch` in a group, with the member's data as
    `train_group` lays it out (vmapped over the members by `train.make_train_chunk`):

    - single_task: ``(SegmentData padded to the group's widest state and action, act_dim)``; the
      batch carries ``act_dim`` so `losses.action_loss` masks the padded action dims;
    - multi_task: the task-stacked SegmentData (`sample_multitask`, `batch_size` per task);
    - multi_task_finetune: ``(SegmentData at the multi-task width, task index)``, as `train_run`.
    """
    from mdt_jax.data import sample_batch, sample_multitask

    if kind == "single_task":
        return lambda d, k: sample_batch(d[0], k, batch_size) | {"act_dim": d[1]}
    if kind == "multi_task":
        return lambda d, k: sample_multitask(d, k, batch_size)
    if kind == "multi_task_finetune":
        return lambda d, k: sample_batch(d[0], k, batch_size) | {"task_id": jnp.full((batch_size,), d[1], jnp.int32)}
    raise ValueError(f"group kind: unknown {kind!r}; known: {GROUP_KINDS}")


def pad_params(params, shapes):
    """`params` zero-padded at the end of every axis to `shapes` (a tree of the same paths): a
    member's params at its real state/action dims in the group's widest layout. Padded rows of
    embed_state/embed_action see zero inputs, padded columns of predict_action are masked out of
    the loss and predict_state is not in it, so the padded entries get exactly zero gradient and
    stay zero under AdamW (decay of 0 is 0), and the clipping norm does not change."""
    def pad(x, s):
        if x.ndim != len(s.shape) or any(a > b for a, b in zip(x.shape, s.shape)):
            raise ValueError(f"pad_params: shape {x.shape} does not fit inside {s.shape}")
        return jnp.pad(x, [(0, b - a) for a, b in zip(x.shape, s.shape)])
    return jax.tree.map(pad, params, shapes)


def slice_params(params, shapes):
    """`params` cut back to `shapes` (the inverse of `pad_params`)."""
    return jax.tree.map(lambda x, s: x[tuple(slice(0, n) for n in s.shape)], params, shapes)


def _first_difference(a, b, prefix: str = "") -> str | None:
    """The first (sorted) key path where two JSON-like dicts differ, e.g. 'model.hidden_size'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return prefix + k
            d = _first_difference(a[k], b[k], prefix + k + ".")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


def _json(x):
    return json.loads(json.dumps(x))


def _get(d: dict, path: str):
    for k in path.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def memory_budget(max_bytes: int | None = None) -> tuple[int, str]:
    """(bytes, where from): `max_bytes` when > 0, else `DEVICE_MEMORY_FRACTION` of the default
    device's allocator limit on an accelerator, or `HOST_MEMORY_FRACTION` of the physical RAM
    (``os.sysconf``) on CPU."""
    if max_bytes:
        return int(max_bytes), "max_bytes"
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(DEVICE_MEMORY_FRACTION * stats["bytes_limit"]), \
                f"{DEVICE_MEMORY_FRACTION} of the {dev.device_kind}'s {stats['bytes_limit'] / 2**30:.1f} GiB"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(HOST_MEMORY_FRACTION * ram), f"{HOST_MEMORY_FRACTION} of the machine's {ram / 2**30:.1f} GiB RAM"


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _data_struct(kind: str, cfg: DTConfig):
    """ShapeDtypeStructs of one member's data in the group layout, with one trajectory of one step
    (a sampled batch's shape does not depend on the dataset's length)."""
    from mdt_jax.data import SegmentData

    f32, i32 = jnp.float32, jnp.int32
    lead = (len(cfg.tasks),) if kind == "multi_task" else ()
    S = lambda *shape, dt=f32: jax.ShapeDtypeStruct(lead + shape, dt)
    seg = SegmentData(observations=S(1, cfg.state_dim), actions=S(1, cfg.act_dim), returns_to_go=S(1),
                      timesteps=S(1, dt=i32), traj_starts=S(1, dt=i32), traj_lens=S(1, dt=i32), traj_probs=S(1),
                      state_mean=S(cfg.state_dim), state_std=S(cfg.state_dim), context_len=cfg.context_len,
                      max_ep_len=cfg.max_ep_len)
    return seg if kind == "multi_task" else (seg, jax.ShapeDtypeStruct((), i32))


def estimate_group_bytes(cfg: DTConfig, tcfg: TrainConfig, kind: str, n_models: int) -> dict[str, int]:
    """Bytes a group of `n_models` members of `cfg` needs on its device, from shapes only
    (`jax.eval_shape`: nothing is allocated):

    - state: the stacked TrainStates (params, Adam moments, init_reg anchors) of `train.init_state`;
    - grads: one more params-sized tree per model (the gradient), and one for the update;
    - batch: one sampled batch per model (`group_sample` on the group's data layout);
    - activations (an estimate, float32, kept for the backward pass of a step): per row of the
      batch and per block, ``T (12 H + 2 I) + 3 n_head T^2`` values (LayerNorm outputs, fused
      qkv, attention and projection outputs, residuals: about 12 T H; the MLP's hidden layer
      before and after its activation: 2 T I; attention scores, probabilities and the dropout
      mask: 3 n_head T^2), with T = 3 K tokens, plus ``4 T H`` for the embeddings.

    The training data are not counted here (`train_group` adds them once loaded). Against XLA's
    compiled grouped step (`memory_analysis`: temp + argument bytes) the total is an upper bound,
    8-20% above it at H32-H128 (tests/test_group.py checks <= 1.5x)."""
    G = int(n_models)
    state = jax.eval_shape(lambda: jax.vmap(lambda s: init_state(cfg, tcfg, jax.random.key(s)))(jnp.arange(G)))
    params = _nbytes(state.params)
    batch = jax.eval_shape(group_sample(kind, tcfg.batch_size), _data_struct(kind, cfg), jax.random.key(0))
    rows = int(batch["mask"].shape[0])
    T, H, I = 3 * cfg.context_len, cfg.hidden_size, cfg.inner_dim
    per_row = cfg.n_layer * (T * (12 * H + 2 * I) + 3 * cfg.n_head * T * T) + 4 * T * H
    out = {"state": _nbytes(state), "grads": 2 * params, "batch": G * _nbytes(batch),
           "activations": G * 4 * rows * per_row}
    return out | {"total": sum(out.values())}


@dataclasses.dataclass
class _Member:
    run: TrainRun
    workdir: str
    cfg: DTConfig             # the member's own (real-shape) config
    init_cfg: DTConfig | None
    kind: str


def _plan(runs: list[TrainRun], workdirs: list[str]) -> tuple[list[_Member], DTConfig, TrainConfig, str]:
    """Validate a group without reading any array: (members, group config, TrainConfig, kind)."""
    if not runs or len(runs) != len(workdirs):
        raise ValueError(f"train_group: {len(runs)} runs but {len(workdirs)} workdirs (need as many, at least one)")
    if len(set(workdirs)) != len(workdirs):
        raise ValueError("train_group: workdirs: a workdir appears twice")
    shared = [_json({k: v for k, v in r.run_config().items() if k not in GROUP_FREE}) for r in runs]
    for i, d in enumerate(shared[1:], start=1):
        field = _first_difference(shared[0], d)
        if field is not None:
            raise ValueError(f"train_group: runs 0 and {i} differ in config.{field} ({_get(shared[0], field)!r} vs "
                             f"{_get(d, field)!r}); a group's runs share everything but {', '.join(GROUP_FREE)}")
    r0 = runs[0]
    unsupported = [(f, getattr(r0, f)) for f in ("init_from_lm", "lm_tokens") if getattr(r0, f)]
    unsupported += [("lm_kmeans", r0.lm_kmeans)] if r0.lm_kmeans else []
    unsupported += [("save_mode", r0.save_mode)] if r0.save_mode != "last" else []
    unsupported += [("eval_every", r0.eval_every)] if r0.eval_every else []
    unsupported += [("mesh_devices", r0.mesh_devices)] if r0.mesh_devices not in (0, 1) else []
    if unsupported:
        f, v = unsupported[0]
        raise ValueError(f"train_group: config.{f}={v!r} is not supported in a group (a group trains on one device, "
                         "from seeds or checkpoints, and saves the last params); train these runs alone (train_run)")
    if jax.process_count() > 1:
        raise ValueError("train_group: a group trains on one host; train multi-host runs alone (train_run)")
    tcfg = _check_run(r0)[0]
    members = []
    for r, w in zip(runs, workdirs):
        _check_run(r)
        init_cfg = checkpoint.read_model_meta(r.init_from).cfg if r.init_from else None
        kind = _run_kind(r, init_cfg)
        if kind == "multi_task_finetune":
            cfg = init_cfg
        elif kind == "multi_task":
            cfg = init_cfg or model_config(r.model, 0, 0, tasks=[(t, *task_dims(t)) for t in r.task])
        else:
            cfg = _single_task_cfg(r, init_cfg)
        members.append(_Member(r, w, cfg, init_cfg, kind))
    kinds = [m.kind for m in members]
    if len(set(kinds)) > 1:
        i = kinds.index(next(k for k in kinds if k != kinds[0]))
        raise ValueError(f"train_group: run 0 trains a {kinds[0]} model and run {i} a {kinds[i]} one "
                         "(config.task / config.init_from); a group holds one kind")
    kind = kinds[0]
    free = ("state_dim", "act_dim") if kind == "single_task" else ()
    c0 = {k: v for k, v in members[0].cfg.to_dict().items() if k not in free}
    for i, m in enumerate(members[1:], start=1):
        field = _first_difference(_json(c0), _json({k: v for k, v in m.cfg.to_dict().items() if k not in free}))
        if field is not None:
            raise ValueError(f"train_group: runs 0 and {i} build different models (DTConfig.{field}; "
                             f"config.init_from {members[0].run.init_from!r} / {m.run.init_from!r}); a group shares "
                             "one shape")
    gcfg = members[0].cfg
    if kind == "single_task":
        gcfg = gcfg.replace(state_dim=max(m.cfg.state_dim for m in members),
                            act_dim=max(m.cfg.act_dim for m in members))
    return members, gcfg, tcfg, kind


def _check_members(path: str, recorded: dict, entries: list[dict]) -> None:
    rec = recorded.get("members", [])
    if len(rec) != len(entries):
        raise ValueError(f"train_group: {path} records a group of {len(rec)} runs, this call has {len(entries)}; "
                         "a group_dir holds one group (use a new group_dir)")
    for i, (a, b) in enumerate(zip(rec, entries)):
        if a.get("workdir") != b["workdir"]:
            raise ValueError(f"train_group: member {i}: workdir {b['workdir']} but {path} records {a.get('workdir')}")
        field = _first_difference(a.get("run_config", {}), b["run_config"])
        if field is not None:
            raise ValueError(f"train_group: member {i} ({b['workdir']}) differs from the run {path} records in "
                             f"config.{field} ({_get(a['run_config'], field)!r} recorded, now "
                             f"{_get(b['run_config'], field)!r}); use a new group_dir")


def train_group(runs: Sequence[TrainRun], workdirs: Sequence[str], *, group_dir: str, max_bytes: int | None = None,
                progress: bool = True, stop_after: int | None = None) -> list[str]:
    """Train same-shaped runs in one vmapped program; returns each run's model folder, in order.

    Each member ends exactly as `train_run(run, workdir)` would leave it (model/ with the same
    metadata keys and normalisers, `run_config.json` in its workdir), to float tolerance of the
    params: the group trains `train.make_train_chunk(..., vmapped=True)` over the members' stacked
    TrainStates, each from its own seed (data order, dropout) and init. The runs must agree on
    every field but `GROUP_FREE` (task, dataset, seed, init_seed, init_from, init_trunk_from), and
    be one kind:

    - single-task DTs, any tasks: every task is padded to the widest state and action of the group
      (`data.pad_to`, after normalisation, so padded state dims are 0), the padded action dims are
      masked out of the loss (``batch['act_dim']``), and each member's init is built at its real
      shape (`init_params_for_seed`, `trunk_from_checkpoint`, `init_from`) and zero-padded
      (`pad_params`: those entries get zero gradient and stay zero); at save time each member is
      cut back to its real shape (`slice_params`);
    - multi-task DTs (e.g. one per seed);
    - finetunes of multi-task checkpoints on one task each (the same model config).

    Not supported (a ValueError, not a silent difference): the LM init, save_mode best/both,
    evaluation during training, more than one device or host.

    Memory: before anything is read or allocated, `estimate_group_bytes` (jax.eval_shape) must fit
    `max_bytes` (default `memory_budget`: a fraction of the device's memory, or of the RAM on CPU),
    and again with the loaded data before they are stacked; otherwise a ValueError naming
    `max_bytes`, with nothing written.

    Resume: `group_dir` holds the group's one orbax checkpoint of the whole stack (`train.fit`: a
    single atomic save, so a kill cannot leave members at different steps), its metrics and
    `members.json` (each member's workdir and run config). The same call again resumes bit for
    bit; a call with other members is refused naming the field. Members whose model/ exists are
    not trained (all of them: nothing is built); members are saved with `checkpoint.save_once`,
    so saving is idempotent when a kill interrupted it. `stop_after` stops after that many steps
    of this call with the group checkpointed and no member saved (an interruption, for tests).
    """
    from mdt_jax.data import pad_to, stack_segment_data
    from mdt_jax.models.dt import param_shapes

    runs, workdirs = list(runs), [os.path.abspath(os.fspath(w)) for w in workdirs]
    model_dirs = [os.path.join(w, "model") for w in workdirs]
    done = [os.path.exists(os.path.join(d, checkpoint.META_FILE)) for d in model_dirs]
    if all(done):
        return model_dirs
    members, gcfg, tcfg, kind = _plan(runs, workdirs)
    group_dir = os.path.abspath(group_dir)
    path = os.path.join(group_dir, MEMBERS_FILE)
    entries = _json([{"workdir": m.workdir, "run_config": _guarded_run_config(m.run)} for m in members])
    recorded = None
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        _check_members(path, recorded, entries)
        stacked = [bool(e.get("stacked", True)) for e in recorded["members"]]
    else:
        stacked = [not d for d in done]
    idx = [i for i, s in enumerate(stacked) if s]  # the members in the stack (saved ones stay in it)
    if all(done[i] for i in idx):  # a member missing its model/ was not in the recorded stack
        raise ValueError(f"train_group: {path} records no member left to train, yet some have no model/ "
                         f"({[workdirs[i] for i, d in enumerate(done) if not d]}); train them alone (train_run)")
    budget, where = memory_budget(max_bytes)

    def check(need: dict):
        if need["total"] > budget:
            parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in need.items() if k != "total")
            raise ValueError(f"train_group: the group of {len(idx)} {kind} models (H{gcfg.hidden_size} "
                             f"L{gcfg.n_layer} K{gcfg.context_len} B{tcfg.batch_size}) needs about "
                             f"{need['total'] / 2**20:.1f} MiB ({parts}), over the budget of {budget / 2**20:.1f} "
                             f"MiB ({where}); raise max_bytes (config.group.max_bytes) or split the group "
                             "(config.group.max_models)")

    need = estimate_group_bytes(gcfg, tcfg, kind, len(idx))
    check(need)
    for m in members:
        check_run_config(m.workdir, _guarded_run_config(m.run))
    # the data, each (task, dataset) read once, and the finetunes' checkpoints, each loaded once
    cache: dict = {}

    def load(task, dataset, cfg, rtg_scale):
        key = (task, dataset, cfg.context_len, cfg.max_ep_len, float(rtg_scale))
        if key not in cache:
            cache[key] = _load_task_data(task, dataset, cfg, rtg_scale)
        return cache[key]

    inits: dict = {}
    setups = []
    for i in idx:
        m = members[i]
        if m.run.init_from and m.run.init_from not in inits:
            inits[m.run.init_from] = checkpoint.load(m.run.init_from)
        init = inits.get(m.run.init_from)
        cfg, data, norms, meta, _ = _task_setup(m.run, tcfg, init, load=load)
        if kind == "single_task":
            data = (pad_to(data, gcfg.state_dim, gcfg.act_dim), cfg.act_dim)
        elif kind == "multi_task_finetune":
            data = (data, cfg.task_index(m.run.task[0]))
        setups.append((m, cfg, data, norms, meta | _trunk_meta(m.run), init))
    if kind == "multi_task":
        stacked_data = pad_stack([s[2] for s in setups])
    else:
        stacked_data = (stack_segment_data([s[2][0] for s in setups]),
                        jnp.asarray([s[2][1] for s in setups], jnp.int32))
    check(need | {"data": _nbytes(stacked_data), "total": need["total"] + _nbytes(stacked_data)})
    # every check passed: record the group, then each member's run (as train_run does)
    if recorded is None:
        os.makedirs(group_dir, exist_ok=True)
        write_json_atomic(path, {"kind": kind, "model": gcfg.to_dict(),
                     "members": [e | {"stacked": s} for e, s in zip(entries, stacked)]})
    for m in members:
        run_config_guard(m.workdir, _guarded_run_config(m.run))
    gshapes = param_shapes(gcfg)

    def init():
        states = []
        for m, cfg, _, _, _, ckpt in setups:
            params = _start_params(m.run, cfg, ckpt.params if ckpt is not None else None)
            if params is None:
                params = init_params_for_seed(cfg, int(m.run.seed))
            states.append(init_state(gcfg, tcfg, jax.random.key(int(m.run.seed)), pad_params(params, gshapes)))
        return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    r0 = members[0].run
    names = ",".join(os.path.basename(s[0].workdir) for s in setups)
    state = fit(gcfg, tcfg, stacked_data, num_steps=r0.num_steps, workdir=group_dir, init=init, vmapped=True,
                steps_per_call=r0.steps_per_call, checkpoint_every=r0.checkpoint_every, log_every=r0.log_every,
                sample=group_sample(kind, tcfg.batch_size), progress=progress,
                desc=f"group x{len(setups)} {names[:60]}", stop_after=stop_after)
    if int(np.min(jax.device_get(state.step))) < r0.num_steps:  # stopped early (stop_after)
        return model_dirs
    params = jax.device_get(state.params)
    steps = np.asarray(jax.device_get(state.step))
    for j, (m, cfg, _, norms, meta, _) in enumerate(setups):
        own = slice_params(jax.tree.map(lambda x: x[j], params), param_shapes(cfg))
        tasks = tuple(cfg.task_names) if cfg.multi else tuple(norms)
        checkpoint.save_once(os.path.join(m.workdir, "model"), own, checkpoint.Model(cfg, None, norms, tasks, {}),
                             _member_meta(m.run, meta, int(steps[j])) | {"checkpoint_mode": "last"})
    return model_dirs
