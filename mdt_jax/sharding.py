"""Several devices and hosts through `jax.sharding`: one 1-D mesh, axis 'data', over the devices.

What is split over the mesh, and how (everything else is replicated):
- training: the sampled batch, on its batch axis (`shard_batch`, a sharding constraint in the
  step); params, optimizer state and the dataset are replicated, and XLA all-reduces the gradient;
- Fisher: the batches, across devices (`sum_split`: each device scans its share, then one sum);
- evaluation: merge candidates, or episodes when the candidates do not divide the mesh
  (`split_rollouts`, a shard_map; mjx executor), and the candidate axis of the jitted policy
  call when it divides the mesh (native executor; the MuJoCo C physics stays on the host).

Throughout the library, `mesh=None` means one device, as before. Multi-host: call
`initialize_distributed()` first; `data_mesh()` then spans every host's devices, and each host
runs the same program on the same inputs (`put` checks they agree).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
    """Start multi-host JAX (`jax.distributed.initialize`) when there is more than one process.

    It runs when given a coordinator ("host:port") or `num_processes` > 1, here or in the
    environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), inside a SLURM or
    Open MPI job of more than one task, or with `auto` (TPU pods and other clusters that JAX
    detects itself); unset values are detected by JAX. Call it before any other JAX call.
    Returns whether JAX is now distributed; a single process is left alone.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or _int_env("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("JAX_PROCESS_ID")
    in_job = (_int_env("SLURM_NTASKS") or 1) > 1 or (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1
    if not (auto or coordinator_address or (num_processes or 1) > 1 or in_job):
        return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v else None


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh (axis 'data') over `devices`, by default every device of every host."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))


def mesh_for(rows: int, num_devices: int = 0) -> Mesh | None:
    """The training mesh for batches of `rows` samples, or None for one device.

    `num_devices`: 0 picks the most devices that divide `rows` (all of them across hosts), 1 means
    one device, n means n devices (which must divide `rows`).
    """
    devices, multi = jax.devices(), jax.process_count() > 1
    n = num_devices or (len(devices) if multi else max(d for d in range(1, len(devices) + 1) if rows % d == 0))
    if not 0 < n <= len(devices) or (multi and n != len(devices)):
        raise ValueError(f"mesh_devices: {n} devices asked for, {len(devices)} available"
                         + (" (a multi-host mesh spans them all)" if multi else ""))
    if rows % n:
        raise ValueError(f"mesh_devices: {n} devices do not divide the batch of {rows} samples")
    return None if n == 1 else data_mesh(devices[:n])


def put(tree: Any, mesh: Mesh, spec: P = P()) -> Any:
    """Place `tree` on `mesh` as `spec` says (default: replicated). Multi-host: every host passes
    the same values (JAX checks), and this host keeps its shards."""
    if jax.process_count() > 1:  # across hosts, device_put takes host values, not committed arrays
        tree = jax.tree.map(lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", False) else x, tree)
    return jax.device_put(tree, NamedSharding(mesh, spec))


def to_host(tree: Any) -> Any:
    """numpy copies of `tree`'s arrays; an array split across hosts is gathered from all of them."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x)

    return jax.tree.map(get, tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Inside jit: constrain every array of `batch` to be split over the mesh on its leading axis."""
    for x in jax.tree.leaves(batch):
        if x.shape[0] % mesh.size:
            raise ValueError(f"batch of {x.shape[0]} rows does not divide over {mesh.size} devices")
    return jax.lax.with_sharding_constraint(batch, NamedSharding(mesh, P(AXIS)))


def sharded_sampler(sample: Callable, mesh: Mesh | None) -> Callable:
    """`sample(data, key) -> batch` whose batch is split over `mesh` (unchanged for None)."""
    if mesh is None:
        return sample
    return lambda data, key: shard_batch(sample(data, key), mesh)


def sum_split(fn: Callable[[jax.Array, jax.Array], Any], num: int, mesh: Mesh | None) -> Any:
    """The sum over indices i < num of per-index terms, computed by `fn(idx, valid)`, which returns
    the (pytree) sum of the terms of the indices `idx` whose `valid` is True.

    With a mesh, the indices are dealt into one row per device (padded with invalid ones), `fn` is
    vmapped over the rows with the row axis split over the mesh, and the rows' sums are added (one
    all-reduce): the same terms, summed in another order. (Not shard_map: `fn` may close over
    arrays placed on the mesh, which shard_map bodies cannot use in this JAX.)
    """
    idx, valid = jnp.arange(num), jnp.ones(num, bool)
    if mesh is None:
        return fn(idx, valid)
    rows = lambda x: shard_batch(jnp.pad(x, (0, -num % mesh.size)).reshape(mesh.size, -1), mesh)
    return jax.tree.map(lambda x: jnp.sum(x, 0), jax.vmap(fn)(rows(idx), rows(valid)))


def candidate_sharding(mesh: Mesh | None, num_candidates: int) -> NamedSharding | None:
    """Candidates (a leading axis) split over `mesh` when they divide it, else None (one device)."""
    if mesh is None or num_candidates % mesh.size:
        return None
    return NamedSharding(mesh, P(AXIS))


def split_rollouts(fn: Callable, mesh: Mesh | None, params: Any, starts: Any, per_candidate: bool = False) -> Any:
    """`fn(params (M, ...), starts (E, ...)) -> outputs (M, E, ...)`, jitted, on host as numpy;
    with `per_candidate`, starts are (M, E, ...): each candidate's own.

    With a mesh, the M candidates are split across devices when they divide it; otherwise the E
    episodes are (padded to a multiple of the mesh size with copies of the last, dropped after).
    Rollouts are independent, so each device runs `fn` on its share with no communication.
    """
    if mesh is None:
        return to_host(jax.jit(fn)(params, starts))
    ax = int(per_candidate)  # the episode axis of starts
    E, n = jax.tree.leaves(starts)[0].shape[ax], mesh.size
    by_candidate = jax.tree.leaves(params)[0].shape[0] % n == 0
    if not by_candidate:
        last = lambda x: jax.lax.slice_in_dim(x, E - 1, E, axis=ax)
        starts = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(last(x), -E % n, ax)], ax), starts)
    ep = P(None, AXIS) if per_candidate else P(AXIS)
    p_spec, s_spec, o_spec = ((P(AXIS), P(AXIS) if per_candidate else P(), P(AXIS)) if by_candidate
                              else (P(), ep, P(None, AXIS)))
    f = jax.shard_map(fn, mesh=mesh, in_specs=(p_spec, s_spec), out_specs=o_spec, check_vma=False)
    out = to_host(jax.jit(f)(put(params, mesh, p_spec), put(starts, mesh, s_spec)))
    return jax.tree.map(lambda x: x[:, :E], out)
