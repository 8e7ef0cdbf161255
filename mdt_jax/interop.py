"""Import and export DT weights from PyTorch: transformers' ``DecisionTransformerModel`` and the
reference merging code's checkpoints (github.com/daniellawson9999/merging-decision-transformers).

Both PyTorch models hold the same GPT-2 trunk (``{trunk}h.{i}.ln_1 / attn.c_attn / attn.c_proj /
ln_2 / mlp.c_fc / mlp.c_proj``, ``{trunk}ln_f``; trunk ``encoder.`` in transformers,
``transformer.`` in the reference) and the same DT heads. One table (`key_table`) maps every module
of ours to its torch name, and serves both directions:

- GPT-2 ``Conv1D`` weights are stored (in, out) like our kernels: copied as is;
- ``torch.nn.Linear`` weights are (out, in): transposed;
- LayerNorm ``weight`` is our ``scale``; Embedding ``weight`` is our ``embedding``.

Facts each format brings:

- transformers adds the timestep embedding to each token *before* ``embed_ln``
  (``timestep_embedding='before_ln'``), and then adds ``wpe(position_ids)`` with position_ids all
  zero: the constant ``wpe[0]`` after a LayerNorm, which `import_hf` folds into
  ``embed_ln/bias``. `export_hf` writes ``wpe`` as zeros (and the unused ``wte`` as zeros), so
  importing an export gives back the identical params. Its ``embed_ln`` always uses eps 1e-5, so
  only ``layer_norm_epsilon=1e-5`` maps onto our single ``layer_norm_eps``.
- The reference adds the timestep embedding *after* ``embed_ln`` (our default 'after_ln') and
  never adds ``wpe``; ``wte``/``wpe`` and the attention buffers ``attn.bias``/``attn.masked_bias``
  are ignored. It saves whole pickled modules (``torch.save(model)``); we only read state dicts
  (see `import_reference`).

Every ``.bin``/``.pt`` file is read with ``torch.load(weights_only=True)``, which refuses pickled
code; ``.safetensors`` through ``safetensors``. torch and safetensors are imported only when a
file needs them.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from typing import Any, Mapping, Sequence

import numpy as np

from mdt_jax import trees
from mdt_jax.fileio import write_dir_atomic
from mdt_jax.models.dt import DTConfig, TaskSpec, param_shapes

HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new",
                  "gelu_pytorch_tanh": "gelu_new"}  # same tanh approximation as gelu_new
HF_DEFAULTS = dict(  # transformers.DecisionTransformerConfig defaults, for keys a config.json omits
    model_type="decision_transformer", state_dim=17, act_dim=4, hidden_size=128, max_ep_len=4096,
    action_tanh=True, vocab_size=1, n_positions=1024, n_layer=3, n_head=1, n_inner=None,
    activation_function="relu", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
    scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
    add_cross_attention=False)
REFERENCE_TASKS = ("hopper", "halfcheetah", "walker2d")  # the reference's experiment_multi.py env order
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

_HEADS = ("embed_return", "embed_state", "embed_action", "embed_ln", "predict_action", "predict_state",
          "predict_return")
LEAVES = {  # module kind -> (our leaf, torch leaf, transpose)
    "linear": (("kernel", "weight", True), ("bias", "bias", False)),
    "conv1d": (("kernel", "weight", False), ("bias", "bias", False)),
    "ln": (("scale", "weight", False), ("bias", "bias", False)),
    "embed": (("embedding", "weight", False),),
}
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of older GPT-2 code, not params
_RESAVE = """\
Re-save it as a plain state dict, in an environment where the reference code is importable and
only if you trust the file:
    m = torch.load(PATH, map_location="cpu", weights_only=False)
    sd = m.state_dict()
    # multi-task models keep per-task heads in plain lists, outside state_dict(); add them:
    for name in ("embed_returns", "embed_states", "embed_actions", "embed_lns", "predict_actions"):
        if hasattr(m, name):
            sd.update({f"{name}.{k}": v for k, v in torch.nn.ModuleList(getattr(m, name)).state_dict().items()})
    torch.save(sd, OUT)   # task order: m.env_ids
"""


class InteropError(ValueError):
    """A foreign checkpoint is unreadable, unsafe, or does not fit a DT we can express."""


# ---------------------------------------------------------------------------------------------
# The key table, shared by every import and export.

def _torch_head(name: str, task: int | None) -> str:
    """Torch module name of a head; `task` indexes the per-task lists of a multi-task model."""
    base = name if task is None else f"{name}s.{task}"
    return base + ".0" if name == "predict_action" else base  # nn.Sequential(Linear, Tanh)


def key_table(cfg: DTConfig, trunk: str) -> list[tuple[str, str, str]]:
    """[(our module path, torch module name, kind)] covering every param of `cfg`'s DT."""
    rows = [("embed_timestep", "embed_timestep", "embed"), ("ln_f", trunk + "ln_f", "ln")]
    for i in range(cfg.n_layer):
        ours, h = f"block_{i}/", f"{trunk}h.{i}."
        rows += [(ours + "ln_1", h + "ln_1", "ln"), (ours + "ln_2", h + "ln_2", "ln")]
        rows += [(ours + m.replace(".", "/"), h + m, "conv1d")
                 for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    tasks = [(f"task_{t.name}/", i) for i, t in enumerate(cfg.tasks)] or [("", None)]
    for prefix, task in tasks:
        rows += [(prefix + name, _torch_head(name, task), "ln" if name == "embed_ln" else "linear")
                 for name in _HEADS]
    return rows


def expected_shapes(cfg: DTConfig, table) -> dict[str, tuple[int, ...]]:
    """{torch key: shape} that `cfg`'s DT needs."""
    shapes = param_shapes(cfg)
    return {f"{theirs}.{tleaf}": tuple(reversed(s) if transpose else s)
            for ours, theirs, kind in table for leaf, tleaf, transpose in LEAVES[kind]
            for s in [trees.get_path(shapes, f"{ours}/{leaf}").shape]}


def check_tensors(tensors: Mapping[str, np.ndarray], want: Mapping[str, tuple], what: str) -> None:
    """Raise InteropError listing every missing, unexpected or mis-shaped key."""
    got = {k: trees.leaf_shape(v) for k, v in tensors.items()}
    trees.raise_problems(trees.shape_problems(dict(want), got), InteropError, f"{what} does not fit the DT", limit=30)


def _to_params(cfg: DTConfig, tensors: Mapping[str, np.ndarray], trunk: str, what: str,
               also: Mapping[str, tuple] | None = None) -> dict:
    """Params from torch-named tensors, after checking every key and shape (`also`: further keys
    the source must hold, with their shapes, that the caller uses outside the table)."""
    table = key_table(cfg, trunk)
    check_tensors(tensors, {**expected_shapes(cfg, table), **(also or {})}, what)
    params: dict = {}
    for ours, theirs, kind in table:
        for leaf, tleaf, transpose in LEAVES[kind]:
            a = tensors[f"{theirs}.{tleaf}"]
            trees.set_path(params, f"{ours}/{leaf}", np.ascontiguousarray(a.T if transpose else a, np.float32))
    return params


def _to_tensors(cfg: DTConfig, params, trunk: str) -> dict[str, np.ndarray]:
    return {f"{theirs}.{tleaf}": np.ascontiguousarray(a.T if transpose else a, np.float32)
            for ours, theirs, kind in key_table(cfg, trunk) for leaf, tleaf, transpose in LEAVES[kind]
            for a in [np.asarray(trees.get_path(params, f"{ours}/{leaf}"))]}


# ---------------------------------------------------------------------------------------------
# Reading tensors safely.

def _numpy(src: Mapping, what: str) -> dict[str, np.ndarray]:
    """A {name: torch.Tensor | array} mapping as float32 numpy arrays."""
    if not isinstance(src, Mapping):
        raise InteropError(f"{what}: expected a state dict (a mapping of names to tensors), got {type(src).__name__}")
    bad = sorted(str(k) for k, v in src.items() if not isinstance(k, str) or not hasattr(v, "shape"))
    if bad:
        raise InteropError(f"{what}: not a flat state dict of tensors; non-tensor entries: {bad[:10]}")
    out = {}
    for k, v in src.items():
        if hasattr(v, "detach"):  # torch.Tensor
            v = v.detach().cpu().float().numpy()
        out[k] = np.asarray(v, np.float32)
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a weights file as {name: float32 array}.

    ``.safetensors`` goes through safetensors; anything else through
    ``torch.load(weights_only=True)``, which refuses any pickled object that is not a tensor or a
    plain container, so loading never runs code from the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            return _numpy(load_file(path), path)
        except InteropError:
            raise
        except Exception as e:
            raise InteropError(f"{path}: not a readable safetensors file: {type(e).__name__}: {e}") from None
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"[Uu]nsupported (?:global|GLOBAL):? (?:GLOBAL )?([\w.]+)", str(e))
        if found:
            raise InteropError(
                f"{path}: refused to unpickle: it holds the Python object {found.group(1)}, not just tensors, "
                "and torch.load(weights_only=True) never runs code from a file. If it is a whole pickled "
                "model (the reference code saves checkpoints with torch.save(model, ...)):\n" + _RESAVE) from None
        raise InteropError(f"{path}: not a readable torch file ({str(e).splitlines()[0][:200]})") from None
    except Exception as e:
        raise InteropError(f"{path}: not a readable torch file: {type(e).__name__}: {str(e)[:200]}") from None
    return _numpy(obj, path)


def _tensors(src, what: str) -> dict[str, np.ndarray]:
    return _numpy(src, what) if isinstance(src, Mapping) else read_state_dict(src)


# ---------------------------------------------------------------------------------------------
# transformers' DecisionTransformerModel.

def hf_files(src) -> tuple[Any, dict | None]:
    """(weights path or state dict, config.json contents or None) for an HF source."""
    if isinstance(src, Mapping):
        return src, None
    src = os.fspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"no HF model at {src}")
    folder, weights = (src, None) if os.path.isdir(src) else (os.path.dirname(src), src)
    if weights is None:
        found = [os.path.join(folder, f) for f in HF_WEIGHTS if os.path.isfile(os.path.join(folder, f))]
        if not found:
            raise InteropError(f"{folder}: no {' or '.join(HF_WEIGHTS)} (sharded checkpoints are not supported)")
        weights = found[0]
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        return weights, None
    try:
        with open(cfg_path) as f:
            return weights, json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{cfg_path} is not valid JSON: {e}") from None


def check_gpt2_trunk(c: Mapping, defaults: Mapping, where: str) -> None:
    """A GPT-2 config (completed with `defaults`) whose trunk our blocks compute exactly, or an error.

    Attention must be softmax(q k^T / sqrt(head_dim)). reorder_and_upcast_attn only changes the
    precision path of that same product (identical in float32), so it is accepted.
    """
    for key in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if c[key] != defaults[key]:
            raise InteropError(f"{where}: {key}={c[key]!r} is not supported (only {defaults[key]!r}): "
                               "our attention is always softmax(q k^T / sqrt(head_dim)) with no cross-attention")
    if c["activation_function"] not in HF_ACTIVATIONS:
        raise InteropError(f"{where}: activation_function {c['activation_function']!r} is not supported; "
                           f"choose from {sorted(HF_ACTIVATIONS)}")


def _config_from_hf(hf: Mapping, context_len: int | None, dropout: float | None) -> tuple[DTConfig, dict]:
    """Our DTConfig from an HF config.json dict; also returns the dict completed with HF defaults."""
    c = {**HF_DEFAULTS, **hf}
    if c["model_type"] != "decision_transformer":
        raise InteropError(f"config.json: model_type {c['model_type']!r} is not 'decision_transformer'")
    check_gpt2_trunk(c, HF_DEFAULTS, "config.json")
    if float(c["layer_norm_epsilon"]) != 1e-5:
        raise InteropError(f"config.json: layer_norm_epsilon={c['layer_norm_epsilon']} is not supported: transformers' "
                           "embed_ln always uses 1e-5 and our DT has one eps for every LayerNorm")
    pdrop = {k: float(c[k]) for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop")}
    if dropout is None:
        if len(set(pdrop.values())) > 1:
            raise InteropError(f"config.json: dropout rates differ {pdrop} but our DT has one; pass dropout=...")
        dropout = pdrop["resid_pdrop"]
    try:
        cfg = DTConfig(state_dim=c["state_dim"], act_dim=c["act_dim"], hidden_size=c["hidden_size"],
                       n_layer=c["n_layer"], n_head=c["n_head"], context_len=context_len or c.get("context_len", 20),
                       max_ep_len=c["max_ep_len"], dropout=dropout,
                       activation=HF_ACTIVATIONS[c["activation_function"]], action_tanh=bool(c["action_tanh"]),
                       timestep_embedding="before_ln", n_inner=c["n_inner"], layer_norm_eps=1e-5)
    except ValueError as e:
        raise InteropError(f"config.json: {e}") from None
    return cfg, c


def import_hf(path_or_state_dict, config: Mapping | None = None, *, context_len: int | None = None,
              dropout: float | None = None) -> tuple[DTConfig, dict]:
    """Import a transformers ``DecisionTransformerModel`` as (DTConfig, params).

    path_or_state_dict: a ``save_pretrained`` folder (config.json + model.safetensors or
      pytorch_model.bin), one such weights file (config.json next to it), or a state dict.
    config: the HF config.json contents as a dict; needed for a state dict, else read from disk.
    context_len: HF has no K; taken from here, else config.json's ``context_len``, else 20.
    dropout: HF has three rates (resid/attn/embd_pdrop), we have one; needed only if they differ.

    The model gets ``timestep_embedding='before_ln'``, and HF's constant ``wpe[0]`` (added to
    every token after ``embed_ln``) is folded into ``embed_ln/bias``.
    """
    weights, disk_config = hf_files(path_or_state_dict)
    config = config if config is not None else disk_config
    if config is None:
        raise InteropError("import_hf needs the HF config: pass config= (the config.json dict) "
                           "or a folder holding config.json")
    cfg, hf = _config_from_hf(config, context_len, dropout)
    what = "HF state dict" if isinstance(weights, Mapping) else weights
    tensors = {k: v for k, v in _tensors(weights, what).items() if not k.endswith(BUFFERS)}
    H = cfg.hidden_size
    outside_table = {"encoder.wte.weight": (hf["vocab_size"], H), "encoder.wpe.weight": (hf["n_positions"], H)}
    params = _to_params(cfg, tensors, "encoder.", what, also=outside_table)
    params["embed_ln"]["bias"] = params["embed_ln"]["bias"] + tensors["encoder.wpe.weight"][0]
    return cfg, params


def export_hf(config: DTConfig, params, folder: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write `folder` (config.json + model.safetensors) that
    ``transformers.DecisionTransformerModel.from_pretrained(folder)`` loads. Returns its path.

    Only single-task models with ``timestep_embedding='before_ln'`` and ``layer_norm_eps=1e-5``
    fit HF's architecture. ``wpe`` and ``wte`` are written as zeros (HF adds ``wpe[0]`` after
    ``embed_ln``; ours is already inside ``embed_ln/bias``), and ``context_len`` goes into
    config.json as an extra key that `import_hf` reads back. The folder is written atomically and
    an existing non-empty one is replaced only with ``overwrite=True``.
    """
    from safetensors.numpy import save_file

    if config.multi:
        raise InteropError("export_hf: multi-task DTs have no transformers equivalent; export one task's model")
    if config.timestep_embedding != "before_ln":
        raise InteropError("export_hf: transformers adds the timestep embedding before embed_ln, so a "
                           f"timestep_embedding={config.timestep_embedding!r} model cannot be expressed")
    if config.layer_norm_eps != 1e-5:
        raise InteropError(f"export_hf: transformers' embed_ln uses eps 1e-5, this model {config.layer_norm_eps}")
    H, n_positions = config.hidden_size, 1024
    tensors = _to_tensors(config, params, "encoder.")
    tensors["encoder.wte.weight"] = np.zeros((1, H), np.float32)
    tensors["encoder.wpe.weight"] = np.zeros((n_positions, H), np.float32)
    hf = {**HF_DEFAULTS, "architectures": ["DecisionTransformerModel"], "state_dim": config.state_dim,
          "act_dim": config.act_dim, "hidden_size": H, "n_layer": config.n_layer, "n_head": config.n_head,
          "n_inner": config.n_inner, "max_ep_len": config.max_ep_len, "action_tanh": config.action_tanh,
          "activation_function": config.activation, "n_positions": n_positions, "vocab_size": 1,
          "resid_pdrop": config.dropout, "attn_pdrop": config.dropout, "embd_pdrop": config.dropout,
          "context_len": config.context_len, "dtype": "float32"}

    def write_config(path):
        with open(path, "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)

    return write_dir_atomic(os.fspath(folder), {
        "config.json": write_config,
        "model.safetensors": lambda path: save_file(tensors, path, metadata={"format": "pt"}),
    }, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# The reference merging code.

def _shape(tensors, key: str, what: str) -> tuple[int, ...]:
    if key not in tensors:
        raise InteropError(f"{what}: missing {key}, so this is not a reference DT state dict "
                           f"(keys start with {sorted(tensors)[:8]})")
    return tensors[key].shape


def import_reference(path_or_state_dict, *, n_head: int = 1, context_len: int = 20, activation: str = "relu",
                     action_tanh: bool = True, dropout: float = 0.1, task_names: Sequence[str] | None = None,
                     timestep_embedding: str = "after_ln") -> tuple[DTConfig, dict]:
    """Import a reference (PyTorch) DT state dict as (DTConfig, params).

    The reference saves whole pickled modules (``torch.save(model)``). Those are refused, since
    unpickling them runs code; the error explains how to re-save one as a state dict. Keys look
    like ``transformer.h.0.attn.c_attn.weight``, ``embed_state.weight``, ``predict_action.0.weight``.

    Dims (state/action, hidden, layers, MLP width, max_ep_len) are read from the tensor shapes.
    What shapes cannot tell is taken from the arguments, with the reference's defaults:
    ``n_head`` (1; the multi-task README model uses 4), ``activation`` ('relu'; multi-task:
    'gelu_new'), ``context_len`` (K=20), ``action_tanh``, ``dropout``. ``timestep_embedding``
    is 'after_ln' for the merging code; 'before_ln' reads the original DT code's checkpoints,
    which share the key layout.

    Multi-task: per-task heads under ``embed_returns.{i}``, ``embed_states.{i}``,
    ``embed_actions.{i}``, ``embed_lns.{i}``, ``predict_actions.{i}.0`` (the layout the re-save
    recipe writes) become ``task_{name}/...`` for ``task_names`` (default: the reference's
    hopper, halfcheetah, walker2d order for three tasks). The reference has one shared
    ``predict_return``, copied to every task, and one ``predict_state`` sized for task 0, copied
    where the state width matches and zero elsewhere (neither is trained, nor used for actions).
    The top-level ``embed_state`` etc. of a multi-task model alias one task's heads and are ignored.
    """
    what = "reference state dict" if isinstance(path_or_state_dict, Mapping) else os.fspath(path_or_state_dict)
    tensors = {k: v for k, v in _tensors(path_or_state_dict, what).items()
               if not (k.endswith(BUFFERS) or k.startswith(("transformer.wte.", "transformer.wpe.")))}
    H = _shape(tensors, "embed_ln.weight" if "embed_ln.weight" in tensors else "embed_lns.0.weight", what)[0]
    n_layer = len({k.split(".")[2] for k in tensors if k.startswith("transformer.h.")})
    inner = _shape(tensors, "transformer.h.0.mlp.c_fc.weight", what)[1]
    common = dict(hidden_size=H, n_layer=n_layer, n_head=n_head, context_len=context_len,
                  max_ep_len=_shape(tensors, "embed_timestep.weight", what)[0], dropout=dropout,
                  activation=activation, action_tanh=action_tanh, timestep_embedding=timestep_embedding,
                  n_inner=None if inner == 4 * H else inner, init_scheme="reference")
    n_tasks = len({k.split(".")[1] for k in tensors if k.startswith("embed_states.")})
    names = tuple(task_names or (REFERENCE_TASKS if n_tasks == len(REFERENCE_TASKS) else ()))
    if len(names) != n_tasks:
        raise InteropError(f"{what}: a {n_tasks}-task model needs {n_tasks} task_names "
                           f"(got {list(names)}; a single-task model takes none)")
    heads = [(f"embed_states.{i}", f"embed_actions.{i}") for i in range(n_tasks)] or [("embed_state", "embed_action")]
    dims = [(_shape(tensors, f"{s}.weight", what)[1], _shape(tensors, f"{a}.weight", what)[1]) for s, a in heads]
    try:
        cfg = (DTConfig.multi_task([TaskSpec(n, *d) for n, d in zip(names, dims)], **common) if n_tasks
               else DTConfig(state_dim=dims[0][0], act_dim=dims[0][1], **common))
    except ValueError as e:
        raise InteropError(f"{what}: {e}") from None
    if not cfg.multi:
        return cfg, _to_params(cfg, tensors, "transformer.", what)
    aliases = tuple(_torch_head(h, None) + "." for h in _HEADS if h not in ("predict_state", "predict_return"))
    tensors = {k: v for k, v in tensors.items() if not k.startswith(aliases)}
    shared = {k: tensors.pop(k) for k in ("predict_state.weight", "predict_state.bias",
                                          "predict_return.weight", "predict_return.bias") if k in tensors}
    for i, t in enumerate(cfg.tasks):
        for k, a in shared.items():
            fits = k.startswith("predict_return") or a.shape[0] == t.state_dim
            tensors[k.replace(".", f"s.{i}.", 1)] = a if fits else np.zeros((t.state_dim,) + a.shape[1:], np.float32)
    S0 = cfg.tasks[0].state_dim
    also = {"predict_state.weight": (S0, H), "predict_state.bias": (S0,), "predict_return.weight": (1, H),
            "predict_return.bias": (1,)}
    return cfg, _to_params(cfg, {**tensors, **shared}, "transformer.", what, also=also)
