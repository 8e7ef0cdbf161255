"""Model checkpoints: an orbax pytree plus JSON config metadata, rebuilt from the folder alone.

Layout of a checkpoint folder::

    DIR/mdt.json    {"format": "mdt_jax.dt", "format_version": 1, "config": DTConfig, "metadata": {...}}
    DIR/params/     orbax StandardCheckpointer pytree (plain nested dict)

Writes are atomic: the folder is assembled under a temporary sibling name and renamed into
place, so a reader sees either no checkpoint or a complete one. An existing checkpoint is
never replaced unless `overwrite=True`. `load` validates the JSON and every array's shape and
dtype against the config before anything is restored.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np

from mdt_jax.fileio import orbax_writer, read_config_artifact, read_params_dir, write_dir_atomic, write_json_atomic
from mdt_jax.models.dt import DTConfig, param_shapes

FORMAT = "mdt_jax.dt"
FORMAT_VERSION = 1
META_FILE = "mdt.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, not a DT, or does not match its config."""


def tree_paths(tree) -> dict[str, Any]:
    """{'block_0/attn/c_attn/kernel': leaf, ...} for a nested-dict pytree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


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
    for path, leaf in tree_paths(params).items():
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise CheckpointError(f"{where}: non-finite values at {path}")


def save(directory: str | os.PathLike, params, config: DTConfig, metadata: dict | None = None, *,
         overwrite: bool = False) -> str:
    """Atomically write params + config (+ JSON metadata) to `directory`. Returns the path."""
    directory = os.path.abspath(os.fspath(directory))
    check_params(config, params)
    for path, leaf in tree_paths(params).items():
        if not np.all(np.isfinite(np.asarray(leaf))):
            raise CheckpointError(f"refusing to save non-finite values at {path}")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(),
            "metadata": _json_safe(metadata or {})}

    write_dir_atomic(directory, {"params": orbax_writer(params),
                                 META_FILE: lambda path: write_json_atomic(path, meta)}, overwrite=overwrite)
    return directory


def read_meta(directory: str | os.PathLike) -> tuple[DTConfig, dict]:
    """Validate `DIR/mdt.json` and return (config, metadata) without touching any array."""
    return read_config_artifact(directory, META_FILE, FORMAT, FORMAT_VERSION, CheckpointError, "DT checkpoint",
                                DTConfig.from_dict)


def load(directory: str | os.PathLike) -> tuple[DTConfig, dict, dict]:
    """Return (config, params, metadata). Shapes are checked against the config before restoring."""
    directory = os.path.abspath(os.fspath(directory))
    cfg, metadata = read_meta(directory)
    params = read_params_dir(directory, CheckpointError, "DT checkpoint", param_shapes(cfg), functools.partial(
        _check_loaded, cfg))
    return cfg, params, metadata
