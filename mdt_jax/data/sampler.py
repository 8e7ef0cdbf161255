"""On-device segment sampler, the reference's `get_batch` as one jittable gather.

`segment_data` flattens an `OfflineDataset` into device arrays once; `sample_batch` then draws a
trajectory with probability proportional to its length, a uniform start index si in [0, len-1],
takes steps si..si+K-1 cut at the trajectory's end, and left-pads them to K:

  states    (B,K,S) float32  (s - mean) / std; padded steps are s=0 before normalising
  actions   (B,K,A) float32  padded steps -10
  rtg       (B,K,1) float32  undiscounted return-to-go within the trajectory / rtg_scale, padded 0
                             (the reference's rtg[:, :-1])
  timesteps (B,K)   int32    step index in the trajectory, clipped to max_ep_len - 1, padded 0
  mask      (B,K)   float32  1 for real steps, 0 for padding

Multi-task: `stack_segment_data` zero-pads every task to the widest state/action and the longest
step and trajectory arrays (padding trajectories have probability 0; padded state dims have mean 0,
std 1) and stacks them on a leading task axis. In a `sample_multitask` batch, padded state dims
are 0 everywhere and padded action dims are 0 at real steps and -10 at padded (masked) steps.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax.data.dataset import OfflineDataset

ACTION_PAD = -10.0


@flax.struct.dataclass
class SegmentData:
    """Per-step arrays of concatenated trajectories (N steps, M trajectories), ready for gathers.
    With a leading task axis when built by `stack_segment_data`."""

    observations: jax.Array      # (N,S) float32
    actions: jax.Array           # (N,A) float32
    returns_to_go: jax.Array     # (N,) float32, unscaled
    timesteps: jax.Array         # (N,) int32, index of the step within its trajectory
    traj_starts: jax.Array       # (M,) int32
    traj_lens: jax.Array         # (M,) int32
    traj_probs: jax.Array        # (M,) float32, len / total
    state_mean: jax.Array        # (S,) float32
    state_std: jax.Array         # (S,) float32, std + 1e-6
    context_len: int = flax.struct.field(pytree_node=False, default=20)
    max_ep_len: int = flax.struct.field(pytree_node=False, default=1000)
    rtg_scale: float = flax.struct.field(pytree_node=False, default=1000.0)


def segment_data(ds: OfflineDataset, context_len: int = 20, max_ep_len: int = 1000,
                 rtg_scale: float = 1000.0) -> SegmentData:
    """Build the device-side `SegmentData` of `ds` (host precompute of rtg in float64, stats)."""
    if context_len <= 0:
        raise ValueError(f"context_len must be positive, got {context_len}")
    if max_ep_len <= 0:
        raise ValueError(f"max_ep_len must be positive, got {max_ep_len}")
    if not rtg_scale > 0:
        raise ValueError(f"rtg_scale must be positive, got {rtg_scale}")
    starts, lens = ds.trajectory_bounds()
    if lens.max() < context_len:
        raise ValueError(f"every trajectory is shorter than context_len={context_len} "
                         f"(lengths: min {lens.min()}, max {lens.max()}, {len(lens)} trajectories)")
    suffix = np.append(np.cumsum(ds.rewards[::-1], dtype=np.float64)[::-1], 0.0)  # sum of rewards[i:]
    rtg = suffix[:-1] - np.repeat(suffix[starts + lens], lens)
    obs = ds.observations.astype(np.float64)
    return SegmentData(
        observations=jnp.asarray(ds.observations),
        actions=jnp.asarray(ds.actions),
        returns_to_go=jnp.asarray(rtg, jnp.float32),
        timesteps=jnp.asarray(np.arange(len(ds)) - np.repeat(starts, lens), jnp.int32),
        traj_starts=jnp.asarray(starts, jnp.int32),
        traj_lens=jnp.asarray(lens, jnp.int32),
        traj_probs=jnp.asarray(lens / lens.sum(), jnp.float32),
        state_mean=jnp.asarray(obs.mean(0), jnp.float32),
        state_std=jnp.asarray(obs.std(0) + 1e-6, jnp.float32),
        context_len=int(context_len), max_ep_len=int(max_ep_len), rtg_scale=float(rtg_scale))


def gather_segments(data: SegmentData, traj_idx: jax.Array, start_idx: jax.Array) -> dict:
    """The left-padded segments for explicit (trajectory, start step) pairs, each (B,) int."""
    K = data.context_len
    tlen = jnp.minimum(K, data.traj_lens[traj_idx] - start_idx)                   # (B,)
    offset = jnp.arange(K) - (K - tlen)[:, None]                                  # (B,K), <0 is padding
    real = offset >= 0
    idx = (data.traj_starts[traj_idx] + start_idx)[:, None] + jnp.maximum(offset, 0)
    states = jnp.where(real[..., None], data.observations[idx], 0.0)
    return {
        "states": (states - data.state_mean) / data.state_std,
        "actions": jnp.where(real[..., None], data.actions[idx], ACTION_PAD),
        "rtg": jnp.where(real, data.returns_to_go[idx] / data.rtg_scale, 0.0)[..., None],
        "timesteps": jnp.where(real, jnp.minimum(data.timesteps[idx], data.max_ep_len - 1), 0),
        "mask": real.astype(jnp.float32),
    }


def sample_batch(data: SegmentData, rng: jax.Array, batch_size: int) -> dict:
    """Draw `batch_size` segments (length-weighted trajectory, uniform start); jit with
    `static_argnames='batch_size'`."""
    k_traj, k_start = jax.random.split(rng)
    traj_idx = jax.random.choice(k_traj, data.traj_lens.shape[0], (batch_size,), p=data.traj_probs)
    start_idx = jax.random.randint(k_start, (batch_size,), 0, data.traj_lens[traj_idx])
    return gather_segments(data, traj_idx, start_idx)


def pad_to(data: SegmentData, state_dim: int, act_dim: int) -> SegmentData:
    """Zero-pad one task's SegmentData to a wider (multi-task) state/action (padded std is 1)."""
    pad = lambda x, w, fill=0.0: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, w - x.shape[-1])], constant_values=fill)
    return data.replace(observations=pad(data.observations, state_dim), actions=pad(data.actions, act_dim),
                        state_mean=pad(data.state_mean, state_dim), state_std=pad(data.state_std, state_dim, 1.0))


def _stack(*xs: jax.Array, fill: float = 0.0) -> jax.Array:
    """Pad every array to the elementwise-largest shape with `fill`, then stack on a new axis 0."""
    shape = np.max([x.shape for x in xs], axis=0)
    return jnp.stack([jnp.pad(x, [(0, int(t) - s) for s, t in zip(x.shape, shape)], constant_values=fill)
                      for x in xs])


def stack_segment_data(datas: list[SegmentData]) -> SegmentData:
    """Stack per-task `SegmentData` on a leading task axis (padding described in the module doc)."""
    if not datas:
        raise ValueError("stack_segment_data: no tasks")
    statics = {(d.context_len, d.max_ep_len, d.rtg_scale) for d in datas}
    if len(statics) > 1:
        raise ValueError(f"stack_segment_data: tasks disagree on (context_len, max_ep_len, rtg_scale): "
                         f"{sorted(statics)}")
    if any(d.traj_lens.ndim != 1 for d in datas):
        raise ValueError("stack_segment_data: inputs must be single-task SegmentData (no task axis)")
    return pad_stack(datas)


def pad_stack(datas: list[SegmentData]) -> SegmentData:
    """`SegmentData` (of any layout: single-task, or already task-stacked) stacked on a new leading
    axis, every array padded to the largest: zeros, std 1, so padding trajectories have length 0
    and probability 0."""
    stacked = jax.tree.map(_stack, *datas)
    return stacked.replace(state_std=_stack(*(d.state_std for d in datas), fill=1.0))


def sample_multitask(stacked: SegmentData, rng: jax.Array, batch_per_task: int) -> dict:
    """`sample_batch` vmapped over the task axis, flattened to T*B rows plus `task_id` (T*B,) int32."""
    n_tasks = stacked.traj_lens.shape[0]
    sample = functools.partial(sample_batch, batch_size=batch_per_task)
    batch = jax.vmap(sample)(stacked, jax.random.split(rng, n_tasks))
    batch = jax.tree.map(lambda x: x.reshape((n_tasks * batch_per_task,) + x.shape[2:]), batch)
    batch["task_id"] = jnp.repeat(jnp.arange(n_tasks, dtype=jnp.int32), batch_per_task)
    return batch
