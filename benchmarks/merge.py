"""Merge and sweep speed: vmapped merge + one batched evaluation against a loop of merge-then-evaluate.

    python benchmarks/merge.py [--candidates 16] [--episodes 10] [--max_steps 200] [--json PATH]

1. Merging three H512 L3 4-head multi-task DTs (average, Fisher, TIES) over their trunks: the
   jitted merge time, median of repeats.
2. A 16-point lerp sweep on halfcheetah (which never terminates, so every candidate runs the same
   number of steps) with an H128 L3 K20 policy: (a) `jax.vmap(lerp)` over the 16 coefficients and
   ONE `evaluate` call with the candidates stacked, against (b) 16 sequential runs of merge then
   `evaluate` on one candidate. Both include compilation (the persistent cache is off here), as a
   user's sweep would; each path is timed once. Their returns are compared: the share of episodes
   that are bit-identical, and how far each candidate's mean return moves. Then warm figures: the
   batched sweep once more, and the sequential loop's first (compiling) run rerun warm in place of
   its cold time; `--json`'s common keys (`benchmarks/_common.py`) use them: `cold_s`/`warm_s` the
   batched sweep's, `speedup` = sequential warm / batched warm, `speedup_vs_batched` and
   `floor_fraction` null.
3. With `--fisher`, the exact / faithful Fisher cost ratio from benchmarks/fisher.py, so the JSON
   carries `exact_over_faithful` next to `sweep_speedup`.
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
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import common_keys, common_line  # noqa: E402
from mdt_jax import evaluate as ev, merge as M  # noqa: E402
from mdt_jax.models import DTConfig, count_params, init_params  # noqa: E402


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def time_merges(repeats: int) -> dict:
    tasks = [("hopper", 11, 3), ("halfcheetah", 17, 6), ("walker2d", 17, 6)]
    cfg = DTConfig.multi_task(tasks, hidden_size=512, n_layer=3, n_head=4, activation="gelu_new")
    models = M.stack([init_params(cfg, jax.random.key(i)) for i in range(3)])
    base = init_params(cfg, jax.random.key(9))
    fishers = jax.tree.map(lambda x: jnp.abs(x) + 1e-3, models)
    fns = {"average": jax.jit(lambda m: M.weighted_average(m, subset="blocks")),
           "fisher": jax.jit(lambda m, f: M.fisher_weighted(m, f, subset="blocks")),
           "ties": jax.jit(lambda b, m: M.ties(b, m, 0.2, 1.0, subset="blocks"))}
    args = {"average": (models,), "fisher": (models, fishers), "ties": (base, models)}
    out = {"params_per_model": count_params(base)}
    for name, fn in fns.items():
        t = time.perf_counter()
        _block(fn(*args[name]))  # compile
        out[f"{name}_cold_ms"] = 1e3 * (time.perf_counter() - t)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            _block(fn(*args[name]))
            ts.append(time.perf_counter() - t)
        out[f"{name}_ms"] = 1e3 * statistics.median(ts)
    return out


def time_sweep(candidates: int, episodes: int, max_steps: int) -> dict:
    cfg = DTConfig(state_dim=17, act_dim=6)
    a, b = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1))
    stats = {"halfcheetah": ev.TaskStats(np.zeros(17), np.ones(17), 12000.0)}
    ps = np.linspace(0.0, 1.0, candidates).astype(np.float32)
    kw = dict(episodes=episodes, max_steps=max_steps, executor="native")

    def batched_sweep():
        t = time.perf_counter()
        stacked = jax.vmap(lambda p: M.lerp(a, b, p, subset="attn,mlp"))(jnp.asarray(ps))
        return ev.evaluate(cfg, stacked, ["halfcheetah"], stats, **kw)[0], time.perf_counter() - t

    def one_run(p):
        t = time.perf_counter()
        one = M.lerp(a, b, float(p), subset="attn,mlp")
        return ev.evaluate(cfg, one, ["halfcheetah"], stats, **kw)[0].returns[0], time.perf_counter() - t

    batched, batched_s = batched_sweep()
    again, batched_warm_s = batched_sweep()
    assert np.array_equal(again.returns, batched.returns), "batched sweep is not deterministic"
    runs = [one_run(p) for p in ps]
    sequential_s = sum(s for _, s in runs)
    first_warm_s = one_run(ps[0])[1]  # the first run compiled; its warm rerun replaces it below
    seq = np.asarray([r for r, _ in runs])
    # a 16-wide vmapped matmul rounds differently from a 1-wide one, and halfcheetah's dynamics
    # amplify that over hundreds of steps in some episodes: compare the per-candidate means
    mean_diff = np.abs(seq.mean(1) - batched.returns.mean(1)) / np.abs(seq.mean(1))
    sequential_warm_s = sequential_s - runs[0][1] + first_warm_s
    return {"candidates": candidates, "episodes": episodes, "max_steps": max_steps, "batched_s": batched_s,
            "batched_warm_s": batched_warm_s, "sequential_s": sequential_s, "sequential_warm_s": sequential_warm_s,
            "sweep_speedup": sequential_s / batched_s,
            "identical_episodes": float(np.mean(seq == batched.returns)),
            "mean_return_max_rel_diff": float(mean_diff.max())}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--max_steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fisher", action="store_true", help="also run benchmarks/fisher.py's comparison")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = {"merge_h512": time_merges(args.repeats), "sweep": time_sweep(args.candidates, args.episodes, args.max_steps)}
    m, s = res["merge_h512"], res["sweep"]
    print(f"merge 3 x H512 L3 multi-task DTs ({m['params_per_model'] / 1e6:.1f}M params each), trunk subset, median:")
    print(f"  warm: average {m['average_ms']:.1f} ms | fisher {m['fisher_ms']:.1f} ms | ties {m['ties_ms']:.1f} ms; "
          f"cold (first call, compiling): {m['average_cold_ms']:.0f} | {m['fisher_cold_ms']:.0f} | {m['ties_cold_ms']:.0f} ms")
    print(f"{s['candidates']}-point lerp sweep, halfcheetah, {s['episodes']} episodes x {s['max_steps']} steps, H128 L3:")
    print(f"  sequential merge+evaluate x{s['candidates']}: {s['sequential_s']:.1f} s")
    print(f"  vmapped merge + one batched evaluate:    {s['batched_s']:.1f} s")
    print(f"  speedup {s['sweep_speedup']:.2f}x; {100 * s['identical_episodes']:.0f}% of episodes bit-identical, "
          f"candidate mean returns within {100 * s['mean_return_max_rel_diff']:.2f}%")
    res["sweep_speedup"] = s["sweep_speedup"]
    res |= common_keys(warm_s=s["batched_warm_s"], cold_s=s["batched_s"], peer_s=s["sequential_warm_s"])
    print(f"  warm (a second sweep; the sequential loop with its first, compiling run rerun warm): {common_line(res)}")
    if args.fisher:
        from benchmarks import fisher as F  # noqa: E402
        res["exact_over_faithful"] = F.run()["exact_over_faithful"]
        print(f"exact / faithful Fisher cost: {res['exact_over_faithful']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
