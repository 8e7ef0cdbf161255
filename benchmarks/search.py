"""One CMA-ES generation: a vmapped merge and ONE batched evaluation against M sequential merge-then-evaluate runs.

    python benchmarks/search.py [--candidates 8] [--episodes 2] [--max_steps 100] [--hidden 64]
                                [--layers 2] [--method task_arithmetic] [--json PATH]

A multi-task DT over hopper, halfcheetah and walker2d (H, L from the flags, 1 head, K20) and three
stand-in finetunes (the base plus N(0, 0.02) noise on every trunk and head param). A population
of M per-block coefficient vectors (theta ~ N(0, 0.5^2), the `mdt_jax.search` space of
`--method`) is scored on the same selection episodes by:

(a) what `cma_search` does per generation: `jax.jit(jax.vmap(merge_fn))` over the M thetas, then
    ONE `evaluate` call with the candidates stacked on the leading axis. Timed cold (compilation
    included, the persistent cache is off here: `cold_s`) and again warm (`warm_s`);
(b) M sequential runs of the jitted `merge_fn` on one theta then `evaluate` on that candidate,
    timed warm (after one untimed run that compiles them: `sequential_s`).

Prints both, `speedup` = sequential_s / warm_s, and how far the M fitnesses of (a) and (b) lie
apart; `--json` writes the numbers with the common keys (`benchmarks/_common.py`; no batched peer
and no FLOP floor here, so `speedup_vs_batched` and `floor_fraction` are null).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import common_keys, common_line  # noqa: E402
from mdt_jax import envs, evaluate as ev, search as S  # noqa: E402
from mdt_jax.models import DTConfig, count_params, init_params  # noqa: E402

TASKS = [("hopper", 11, 3), ("halfcheetah", 17, 6), ("walker2d", 17, 6)]


def setup(hidden: int, layers: int, method: str):
    cfg = DTConfig.multi_task(TASKS, hidden_size=hidden, n_layer=layers, n_head=1, context_len=20)
    pre = jax.device_get(jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0)))
    r = np.random.default_rng(1)
    fts = [jax.tree.map(lambda x: (x + 0.02 * r.normal(size=x.shape)).astype(np.float32), pre) for _ in TASKS]
    fishers = [jax.tree.map(lambda x: r.gamma(0.5, size=x.shape).astype(np.float32), f) for f in fts]
    merged = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *fts) if method == "lerp" else None
    space = S.make_space(method, cfg, fts, pre=pre, merged=merged, fishers=fishers)
    stats = {t: ev.TaskStats(np.zeros(sd, np.float32), np.ones(sd, np.float32), envs.target_return(t))
             for t, sd, _ in TASKS}
    return cfg, pre, space, stats


def run(candidates: int, episodes: int, max_steps: int, hidden: int, layers: int, method: str, executor: str) -> dict:
    cfg, pre, space, stats = setup(hidden, layers, method)
    tasks = [t for t, _, _ in TASKS]
    thetas = jnp.asarray(0.5 * np.random.default_rng(2).normal(size=(candidates, space.dim)), jnp.float32)
    kw = dict(episodes=episodes, max_steps=max_steps, seed=1, executor=executor)
    build = jax.jit(jax.vmap(space.merge_fn))

    def generation():
        t = time.perf_counter()
        results = ev.evaluate(cfg, build(thetas), tasks, stats, **kw)
        return time.perf_counter() - t, S.population_fitness(results), results

    cold_s, fit_batched, res_batched = generation()
    warm_s, _, _ = generation()

    merge_one = jax.jit(space.merge_fn)
    ev.evaluate(cfg, merge_one(thetas[0]), tasks, stats, **kw)  # compile the one-candidate path
    t = time.perf_counter()
    seq = [ev.evaluate(cfg, merge_one(th), tasks, stats, **kw) for th in thetas]
    sequential_s = time.perf_counter() - t
    fit_seq = np.concatenate([S.population_fitness(r) for r in seq])
    same = np.mean([np.array_equal(rb.returns[i], rs[k].returns[0]) for i, rs in enumerate(seq)
                    for k, rb in enumerate(res_batched)])
    steps = int(sum(r.lengths.sum() for r in res_batched))
    return {"method": method, "candidates": candidates, "groups": space.dim, "episodes": episodes,
            "max_steps": max_steps, "hidden": hidden, "layers": layers, "params_per_model": count_params(pre),
            "executor": envs.resolve_executor(executor), "env_steps_per_generation": steps,
            "cold_s": cold_s, "warm_s": warm_s, "sequential_s": sequential_s, "speedup": sequential_s / warm_s,
            "identical_task_returns": float(same),
            "fitness_max_abs_diff": float(np.max(np.abs(fit_seq - fit_batched)))} | common_keys(
        warm_s=warm_s, cold_s=cold_s, peer_s=sequential_s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--max_steps", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--method", default="task_arithmetic", choices=S.METHODS)
    ap.add_argument("--executor", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = run(args.candidates, args.episodes, args.max_steps, args.hidden, args.layers, args.method, args.executor)
    print(f"one CMA-ES generation, {res['candidates']} candidates ({res['method']}, {res['groups']} groups), "
          f"H{res['hidden']} L{res['layers']} multi-task DT, 3 tasks x {res['episodes']} episodes x "
          f"<= {res['max_steps']} steps, {res['executor']} ({res['env_steps_per_generation']} env steps):")
    print(f"  vmapped merge + one batched evaluate: cold {res['cold_s']:.2f} s, warm {res['warm_s']:.2f} s")
    print(f"  {res['candidates']} sequential merge + evaluate (warm):  {res['sequential_s']:.2f} s")
    print(f"  speedup {res['speedup']:.2f}x; {100 * res['identical_task_returns']:.0f}% of (candidate, task) "
          f"returns bit-identical, fitness within {res['fitness_max_abs_diff']:.2g}")
    print(f"  {common_line(res)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
