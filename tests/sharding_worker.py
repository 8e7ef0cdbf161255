"""The runs that tests/test_sharding.py compares, each on one device (`mesh=None`) or over a mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT.npz

runs them over a mesh of all (here 8 forced CPU) devices and saves the results to OUT.npz. With
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, each process runs as one host
of a multi-host mesh (CPU collectives through gloo), and process 0 saves.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mdt_jax import evaluate as ev, fisher, sharding, train as T  # noqa: E402
from mdt_jax.data import sample_batch, segment_data  # noqa: E402
from mdt_jax.models import DTConfig  # noqa: E402
from mdt_jax.models.dt import param_shapes  # noqa: E402
from synth import make_dataset  # noqa: E402

CFG = DTConfig(state_dim=11, act_dim=3, hidden_size=16, n_layer=2, n_head=1, context_len=4, max_ep_len=64)
TCFG = T.TrainConfig(batch_size=16, warmup_steps=5, learning_rate=1e-3)


def _data():
    return segment_data(make_dataset(), context_len=CFG.context_len, max_ep_len=CFG.max_ep_len)


def _candidates(m: int):
    """m random param sets stacked on a leading axis, drawn in numpy (compiling flax's init takes
    seconds here); LayerNorm scales around 1, everything else around 0."""
    r = np.random.default_rng(3)
    draw = lambda path, x: (path[-1].key == "scale") + 0.1 * r.standard_normal((m,) + x.shape, np.float32)
    return jax.tree_util.tree_map_with_path(draw, param_shapes(CFG))


def _stats():
    return {"hopper": ev.TaskStats(np.zeros(11, np.float32), np.ones(11, np.float32), 3600.0)}


def _toy_one(p, starts):
    """(E,) returns of one candidate's DT policy in a toy linear env from starts (E, S): the shape
    of the mjx executor's program (a lax.scan of policy steps), compiled in a fraction of its time."""
    def body(carry, t):
        cache, s = carry
        a, cache = ev.policy_step(CFG, p, cache, t, s, jnp.ones(s.shape[0]))
        return (cache, 0.9 * s + jnp.pad(a, ((0, 0), (0, 8)))), jnp.sum(a, -1)
    cache = ev.TokenCache.zeros(starts.shape[0], CFG)
    return jnp.sum(jax.lax.scan(body, (cache, starts), jnp.arange(8))[1], 0)


_toy_rollouts = jax.vmap(_toy_one, in_axes=(0, None))  # every candidate from the same starts
_toy_rollouts_own = jax.vmap(_toy_one)  # candidate m from its own starts[m]


def runs(mesh) -> dict:
    """{name: numpy array}: params after 10 data-parallel steps; Fishers over 5 batches (not a
    multiple of 8, so the split over devices pads); native evaluation returns with 8 candidates
    split across devices (one host only); and `split_rollouts` by candidate (8) and by episode
    (2 candidates, 3 episodes, padded to 8)."""
    out = {}
    chunk = T.make_train_chunk(CFG, TCFG, lambda d, k: sample_batch(d, k, TCFG.batch_size), mesh=mesh)
    params = jax.tree.map(lambda x: x[0], _candidates(1))
    state, data = T.init_state(CFG, TCFG, jax.random.key(0), params), _data()
    if mesh is not None:  # as `fit` does; the Fisher then sees params placed on the mesh
        state, data, params = sharding.put((state, data, params), mesh)
    state, _ = chunk(state, data, 10)
    out |= {f"train/{i}": x for i, x in enumerate(jax.tree.leaves(sharding.to_host(state.params)))}
    for method in fisher.METHODS:
        f = fisher.compute_fisher(CFG, params, data, jax.random.key(1), num_batches=5, batch_size=8,
                                  method=method, mesh=mesh)
        out |= {f"fisher_{method}/{i}": x for i, x in enumerate(jax.tree.leaves(sharding.to_host(f)))}
    if mesh is None or not mesh.is_multi_process:
        r = ev.evaluate(CFG, _candidates(8), ["hopper"], _stats(), episodes=2, max_steps=20, executor="native",
                        mesh=mesh)[0]
        out |= {"eval_native/returns": r.returns, "eval_native/lengths": r.lengths}
    starts = jax.random.normal(jax.random.key(4), (3, CFG.state_dim))
    own = jax.random.normal(jax.random.key(5), (8, 3, CFG.state_dim))
    for m in (8, 2):
        out[f"rollouts_{m}"] = sharding.split_rollouts(_toy_rollouts, mesh, _candidates(m), starts)
        out[f"rollouts_own_{m}"] = sharding.split_rollouts(_toy_rollouts_own, mesh, _candidates(m), own[:m],
                                                           per_candidate=True)
    return jax.tree.map(np.asarray, out)


if __name__ == "__main__":
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sharding.initialize_distributed()
    if len(jax.devices()) < 2:
        sys.exit("run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    out = runs(sharding.data_mesh())
    if jax.process_index() == 0:
        np.savez(sys.argv[1], n_devices=len(jax.devices()), **out)
