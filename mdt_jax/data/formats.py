"""Dataset files: D4RL hdf5, the reference's trajectory pickles, Minari datasets.

Every loader returns an `OfflineDataset`. Writers are atomic (temp file in the target directory,
fsync, `os.replace`) and refuse to overwrite unless told to. Pickles are read with an allow-list
unpickler that can build numpy arrays and nothing else.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Callable, Sequence

import h5py
import numpy as np

from mdt_jax.fileio import write_file_atomic
from mdt_jax.data.dataset import NDIMS, OfflineDataset

FORMAT_VERSION = 1
D4RL_REQUIRED = ("observations", "actions", "rewards", "terminals", "timeouts")


def _require_file(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    return path


# ----------------------------------------------------------------------------------- D4RL hdf5


def save_d4rl_hdf5(ds: OfflineDataset, path, *, overwrite: bool = False) -> None:
    """Write `ds` as a D4RL-layout hdf5 file; metadata goes to the JSON attr `mdt_metadata`."""
    try:
        meta = json.dumps(ds.metadata, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"OfflineDataset.metadata is not JSON-serialisable: {e}") from None

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for key in NDIMS:
                if getattr(ds, key) is not None:
                    f.create_dataset(key, data=getattr(ds, key))
            f.attrs["mdt_metadata"] = meta
            f.attrs["format_version"] = FORMAT_VERSION

    write_file_atomic(path, write, overwrite=overwrite)


def load_d4rl_hdf5(path) -> OfflineDataset:
    """Read a D4RL-layout hdf5 file (D4RL's own files or `save_d4rl_hdf5`'s); other keys are ignored."""
    path = _require_file(path)
    try:
        with h5py.File(path, "r") as f:
            kinds = {k: isinstance(f[k], h5py.Dataset) for k in NDIMS if k in f}
            arrays = {k: f[k][()] for k, is_data in kinds.items() if is_data}
            attrs = {k: f.attrs[k] for k in ("mdt_metadata", "format_version") if k in f.attrs}
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a readable hdf5 file ({type(e).__name__}: {e})") from None
    for key in D4RL_REQUIRED:
        if key not in kinds:
            raise ValueError(f"{path}: missing dataset {key!r}")
    for key, is_data in kinds.items():
        if not is_data:
            raise ValueError(f"{path}: {key!r} is a group, expected a dataset")
    version = int(attrs.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version} is newer than supported ({FORMAT_VERSION})")
    try:
        metadata = json.loads(attrs.get("mdt_metadata", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: attribute 'mdt_metadata' is not valid JSON ({e})") from None
    try:
        return OfflineDataset(**arrays, metadata=metadata)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------------- reference pickles


class UnsafePickleError(ValueError):
    """A pickle referenced a global outside the numpy-array allow-list."""


_NUMPY_CORE = {"multiarray": {"_reconstruct", "scalar"}, "numeric": {"_frombuffer"}}
_PICKLE_ALLOWED = {
    "numpy": {"ndarray", "dtype"},
    "_codecs": {"encode"},  # protocol <= 2 stores bytes as _codecs.encode(str, 'latin1')
    "builtins": {"complex", "set", "frozenset", "bytearray"},
    **{f"numpy.{core}.{mod}": names for core in ("core", "_core") for mod, names in _NUMPY_CORE.items()},
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals numpy arrays, dtypes and scalars (and plain containers) need."""

    def find_class(self, module, name):
        if name not in _PICKLE_ALLOWED.get(module, ()):
            raise UnsafePickleError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core."):  # numpy 1.x path; numpy 2 warns on it
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def save_reference_pickle(data: OfflineDataset | Sequence[dict], path, *, overwrite: bool = False) -> None:
    """Write trajectories (or an OfflineDataset, split into them) as the reference's pickle:
    a list of dicts of numpy arrays."""
    trajectories = data.to_trajectories() if isinstance(data, OfflineDataset) else list(data)

    def write(tmp):
        with open(tmp, "wb") as f:
            pickle.dump(trajectories, f)

    write_file_atomic(path, write, overwrite=overwrite)


def load_reference_pickle(path) -> OfflineDataset:
    """Read the reference's trajectory pickle through the numpy-only unpickler."""
    path = _require_file(path)
    try:
        with open(path, "rb") as f:
            trajectories = _NumpyOnlyUnpickler(f).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # any malformed stream: UnpicklingError, EOFError, struct/Value/TypeError...
        raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(trajectories, list):
        raise ValueError(f"{path}: expected a list of trajectory dicts, got {type(trajectories).__name__}")
    try:
        return OfflineDataset.from_trajectories(trajectories)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------- Minari


def load_minari(dataset_id: str, root=None) -> OfflineDataset:
    """Load a local Minari dataset with minari's API and flatten its episodes to the D4RL layout
    (observations = obs[:-1], next_observations = obs[1:], terminals/timeouts = terminations/
    truncations). `root` defaults to minari's own lookup (`MINARI_DATASETS_PATH`, ~/.minari)."""
    import minari

    if root is None:
        dataset = minari.load_dataset(dataset_id)
    else:
        data_path = os.path.join(os.fspath(root), dataset_id, "data")
        if not os.path.isdir(data_path):
            raise FileNotFoundError(f"minari dataset {dataset_id!r} not found at {data_path}")
        dataset = minari.MinariDataset(data_path)
    columns: dict[str, list] = {k: [] for k in NDIMS}
    for ep in dataset.iterate_episodes():
        if not isinstance(ep.observations, np.ndarray) or not isinstance(ep.actions, np.ndarray):
            raise ValueError(f"minari dataset {dataset_id!r}: episode {ep.id} has non-array "
                             "observations/actions (dict or tuple spaces are not supported)")
        for key, value in (("observations", ep.observations[:-1]), ("next_observations", ep.observations[1:]),
                           ("actions", ep.actions), ("rewards", ep.rewards),
                           ("terminals", ep.terminations), ("timeouts", ep.truncations)):
            columns[key].append(value)
    env_spec = dataset.spec.env_spec
    metadata = {"source": "minari", "dataset_id": dataset_id, "env_id": env_spec.id if env_spec else None}
    try:
        return OfflineDataset(**{k: np.concatenate(v) for k, v in columns.items()}, metadata=metadata)
    except ValueError as e:
        raise ValueError(f"minari dataset {dataset_id!r}: {e}") from None


# -------------------------------------------------------------------------------- dispatch


def load_dataset(spec) -> OfflineDataset:
    """'minari:<id>', or a path ending in .hdf5/.h5 (D4RL) or .pkl/.pickle (reference pickle)."""
    if isinstance(spec, str) and spec.startswith("minari:"):
        return load_minari(spec[len("minari:"):])
    suffix = os.path.splitext(os.fspath(spec))[1].lower()
    if suffix in (".hdf5", ".h5"):
        return load_d4rl_hdf5(spec)
    if suffix in (".pkl", ".pickle"):
        return load_reference_pickle(spec)
    raise ValueError(f"unknown dataset spec {os.fspath(spec)!r}: expected 'minari:<id>' or a path "
                     "ending in .hdf5, .h5, .pkl or .pickle")
