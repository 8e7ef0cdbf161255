"""Offline datasets: the D4RL-layout `OfflineDataset`, its file formats, and the on-device sampler."""
from mdt_jax.data.dataset import OfflineDataset
from mdt_jax.data.formats import (
    UnsafePickleError,
    load_d4rl_hdf5,
    load_dataset,
    load_minari,
    load_reference_pickle,
    save_d4rl_hdf5,
    save_reference_pickle,
)
from mdt_jax.data.loading import load_task_data, register_resolver, resolve
from mdt_jax.data.normalizer import Normalizer
from mdt_jax.data.sampler import (
    SegmentData,
    gather_segments,
    pad_to,
    sample_batch,
    sample_multitask,
    segment_data,
    pad_stack,
    stack_segment_data,
)

__all__ = [
    "Normalizer", "load_task_data", "register_resolver", "resolve", "OfflineDataset", "UnsafePickleError", "load_d4rl_hdf5", "load_dataset", "load_minari",
    "load_reference_pickle", "save_d4rl_hdf5", "save_reference_pickle", "SegmentData",
    "gather_segments", "pad_to", "sample_batch", "sample_multitask", "segment_data", "stack_segment_data", "pad_stack",
]
