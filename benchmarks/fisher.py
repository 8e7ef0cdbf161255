"""Cost of the exact per-example Fisher against the reference's batch-gradient ("faithful") one.

    python benchmarks/fisher.py [--batches 4] [--repeats 7] [--baselines] [--json PATH]

An H128 L3 1-head K20 single-task DT (hopper dims), batches of 64 segments with some left
padding, the trunk-block subset (the default). Each call is one jitted `lax.scan` over `--batches`
batches (`fisher_from_batches`); the two methods are timed alternately (interleaved, after one
compiling call each) and the median over repeats is reported in ms per batch, with the ratio
exact / faithful. The target is exact / faithful <= 2.

`--baselines` also times the straightforward exact Fisher, `jax.vmap(jax.grad)` over the examples
(per-example dropout, every per-example gradient tree materialised), with the squares summed by
`jnp.sum(g * g, 0)` and by the unrolled sum that mdt_jax.fisher uses (XLA:CPU's reduce over the
major axis of a large array is slow).

`--json` carries the common keys (`benchmarks/_common.py`) for ours, the exact Fisher, per call of
`--batches` batches: `cold_s` (its first, compiling call), `warm_s` (median), `speedup` = the
`jnp.sum` vmap(grad) baseline / ours with `--baselines` (else null), `speedup_vs_batched` and
`floor_fraction` null (no batched peer, no FLOP floor counted).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import common_keys, common_line  # noqa: E402
from mdt_jax.fisher import sum_squares, fisher_from_batches  # noqa: E402
from mdt_jax.models import DTConfig, init_params  # noqa: E402
from mdt_jax.train import action_loss  # noqa: E402


def random_batches(cfg: DTConfig, n: int, batch_size: int, seed: int = 0) -> dict:
    """n batches shaped like `sample_batch`'s, about a quarter of the segments left-padded."""
    k = jax.random.split(jax.random.key(seed), 6)
    shape = (n, batch_size, cfg.context_len)
    pad = jnp.where(jax.random.uniform(k[0], shape[:2]) < 0.25,
                    jax.random.randint(k[1], shape[:2], 1, cfg.context_len), 0)
    mask = (jnp.arange(cfg.context_len) >= pad[..., None]).astype(jnp.float32)
    m = mask[..., None]
    return {"states": jax.random.normal(k[2], shape + (cfg.state_dim,)) * m,
            "actions": jnp.where(m > 0, jax.random.uniform(k[3], shape + (cfg.act_dim,), minval=-1, maxval=1), -10.0),
            "rtg": jax.random.uniform(k[4], shape + (1,)) * m,
            "timesteps": (jax.random.randint(k[5], shape[:2], 0, 900)[..., None] + jnp.arange(cfg.context_len))
                         * mask.astype(jnp.int32),
            "mask": mask}


def vmap_grad_fisher(cfg: DTConfig, reduce):
    """Baseline: the blocks' sum over examples of squared `vmap(grad)` per-example gradients, not
    normalised (the cost is what is compared)."""

    @jax.jit
    def fisher(params, batches, rng):
        blocks = {k: v for k, v in params.items() if k.startswith("block_")}

        def share(b, ex, key, w):  # one example's share of the batch loss
            return w * action_loss(cfg, params | b, jax.tree.map(lambda x: x[None], ex), key)

        def body(acc, xs):
            batch, i = xs
            n = batch["mask"].sum(1) * cfg.act_dim
            keys = jax.random.split(jax.random.fold_in(rng, i), n.shape[0])
            g = jax.vmap(jax.grad(share), in_axes=(None, 0, 0, 0))(blocks, batch, keys, n / n.sum())
            return jax.tree.map(lambda a, x: a + reduce(x), acc, g), None

        n_batches = jax.tree.leaves(batches)[0].shape[0]
        return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, blocks), (batches, jnp.arange(n_batches)))[0]

    return fisher


def run(batches: int = 4, repeats: int = 7, batch_size: int = 64, hidden_size: int = 128, n_layer: int = 3,
        baselines: bool = False) -> dict:
    """Time both methods (and the baselines); returns ms per batch (median), the ratio and the setup."""
    cfg = DTConfig(state_dim=11, act_dim=3, hidden_size=hidden_size, n_layer=n_layer, n_head=1, context_len=20)
    params = init_params(cfg, jax.random.key(0))
    data = random_batches(cfg, batches, batch_size)
    rng = jax.random.key(1)
    calls = {m: (lambda m=m: jax.block_until_ready(fisher_from_batches(cfg, params, data, rng, method=m)))
             for m in ("faithful", "exact")}
    if baselines:
        for name, reduce in (("vmap_grad_sum0", lambda g: jnp.sum(g * g, 0)), ("vmap_grad_unrolled", sum_squares)):
            fn = vmap_grad_fisher(cfg, reduce)
            calls[name] = lambda fn=fn: jax.block_until_ready(fn(params, data, rng))
    cold = {}
    for m, call in calls.items():
        t = time.perf_counter()
        call()  # compile
        cold[m] = time.perf_counter() - t
    times = {m: [] for m in calls}
    for _ in range(repeats):
        for m, call in calls.items():
            t = time.perf_counter()
            call()
            times[m].append((time.perf_counter() - t) / batches)
    out = {f"{m}_ms_per_batch": 1e3 * statistics.median(ts) for m, ts in times.items()}
    out["exact_over_faithful"] = out["exact_ms_per_batch"] / out["faithful_ms_per_batch"]
    for name in ("vmap_grad_sum0", "vmap_grad_unrolled"):
        if name in times:
            out[f"{name}_over_faithful"] = out[f"{name}_ms_per_batch"] / out["faithful_ms_per_batch"]
    base = "vmap_grad_sum0" if baselines else None  # the straightforward exact Fisher, the peer of ours
    out |= common_keys(warm_s=statistics.median(times["exact"]) * batches, cold_s=cold["exact"],
                       peer_s=statistics.median(times[base]) * batches if base else None)
    out["cold_s_by_method"] = cold
    out["setup"] = {"hidden_size": hidden_size, "n_layer": n_layer, "context_len": 20, "batch_size": batch_size,
                    "batches_per_call": batches, "repeats": repeats, "subset": "blocks",
                    "device": str(jax.devices()[0].platform)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baselines", action="store_true", help="also time exact via vmap(grad)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = run(args.batches, args.repeats, baselines=args.baselines)
    print(f"Fisher cost per batch, H128 L3 K20 B64, trunk blocks, median of {args.repeats} interleaved repeats "
          f"({res['setup']['device']}):")
    print(f"  faithful (batch grad^2):        {res['faithful_ms_per_batch']:.1f} ms")
    print(f"  exact (per-example grad^2):     {res['exact_ms_per_batch']:.1f} ms")
    print(f"  exact / faithful: {res['exact_over_faithful']:.2f}x")
    for name, what in (("vmap_grad_sum0", "vmap(grad), jnp.sum(g*g, 0)"),
                       ("vmap_grad_unrolled", "vmap(grad), unrolled sum")):
        if f"{name}_ms_per_batch" in res:
            print(f"  baseline exact via {what}: {res[f'{name}_ms_per_batch']:.1f} ms "
                  f"({res[f'{name}_over_faithful']:.2f}x faithful)")
    print(f"  exact, one call of {args.batches} batches: {common_line(res)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
