"""How far the Fisher-merge fix (trace over every trunk block; a guard only on zero denominators
instead of a 1e-8 floor on every entry) moves the merges. A measurement of the merge, not a timing.

    python benchmarks/fisher_floor.py [--workdir runs/quickstart] [--json PATH]

For the P1 (attn+mlp of the single-task DTs) and P2 (blocks of the per-task finetunes) Fisher
merges, the old formula (floor 1e-8, trace over the merged subset) against today's default (the
reference's), with and without trace normalisation:
- `rel_l2`: ||new - old|| / ||new - average||, the shift as a share of how far the Fisher merge
  is from the plain average (1.0 would mean the old merge was the plain average);
- `max_over_spread`: max over entries of |new - old| / (max_i theta_i - min_i theta_i).
Cases: every seed of a quickstart-style study (`--workdir`, if it exists), and three random
H512 L3 4-head multi-task DTs (the paper's multi-task size) with Gamma-distributed Fishers of the
magnitude a real Fisher has at that size.

`--json` holds the cases by name and, beside them, the common keys (`benchmarks/_common.py`) for
the H512 cases' computation, run twice: `cold_s` (the first call, compilation included), `warm_s`
(the second); there is no peer and no FLOP floor, so `speedup`, `speedup_vs_batched` and
`floor_fraction` are null.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import common_keys, common_line  # noqa: E402
from mdt_jax import merge as M, pipelines as P  # noqa: E402


def old_fisher(models, fishers, subset, normalize):
    """The formula before the fix: trace over the merged subset, 1e-8 added to every f_i."""
    mask = M.subset_mask(M.first_model(models), subset)
    n = jax.tree.leaves(models)[0].shape[0]
    sel = [f for f, m in zip(jax.tree.leaves(fishers), jax.tree.leaves(mask)) if m]
    trace = sum(jnp.sum(f.reshape(n, -1), axis=1) for f in sel)
    scale = 1.0 / jnp.where(trace > 0, trace, 1.0) if normalize else jnp.ones((n,))

    def leaf(m, x, f):
        if not m:
            return x[0]
        fi = f * scale.reshape((n,) + (1,) * (f.ndim - 1)) + 1e-8
        return jnp.sum(fi * x, axis=0) / jnp.sum(fi, axis=0)
    return jax.tree.map(leaf, mask, models, fishers)


def shift(models, fishers, subset):
    out = {}
    avg = M.weighted_average(models, subset=subset)
    mask = M.subset_mask(M.first_model(models), subset)
    for normalize in (True, False):
        new = M.fisher_weighted(models, fishers, subset=subset, normalize_trace=normalize)
        old = old_fisher(models, fishers, subset, normalize)
        pick = lambda t: [np.asarray(x, np.float64).ravel() for x, m in zip(jax.tree.leaves(t), jax.tree.leaves(mask)) if m]
        n, o, a = (np.concatenate(pick(t)) for t in (new, old, avg))
        spread = np.concatenate([np.ptp(np.asarray(x, np.float64), axis=0).ravel()
                                 for x, m in zip(jax.tree.leaves(models), jax.tree.leaves(mask)) if m])
        out["normalized" if normalize else "raw"] = {
            "rel_l2": float(np.linalg.norm(n - o) / max(np.linalg.norm(n - a), 1e-30)),
            "max_over_spread": float(np.max(np.abs(n - o) / np.maximum(spread, 1e-30)))}
    return out


def study_cases(workdir):
    from mdt_jax import checkpoint
    from mdt_jax.fisher_stage import load_fisher

    cases = {}
    for sdir in sorted(glob.glob(os.path.join(workdir, "seed_*"))):
        seed = os.path.basename(sdir)
        tasks = sorted({os.path.basename(d)[len("dt_common_"):] for d in glob.glob(os.path.join(sdir, "dt_common_*"))})
        if not tasks:
            continue
        models = [P.trunk(checkpoint.load(os.path.join(sdir, f"dt_common_{t}", "model")).params) for t in tasks]
        fishers = [P.trunk(load_fisher(os.path.join(sdir, f"fisher_common_{t}"))[0].fisher) for t in tasks]
        cases[f"{seed} P1 common attn+mlp"] = shift(M.stack(models), M.stack(fishers), "attn,mlp")
        fts = [checkpoint.load(os.path.join(sdir, f"ft_{t}", "model")).params for t in tasks]
        ffs = [load_fisher(os.path.join(sdir, f"fisher_ft_{t}"))[0].fisher for t in tasks]
        cases[f"{seed} P2 blocks"] = shift(M.stack(fts), M.stack(ffs), "blocks")
    return cases


def h512_case():
    from mdt_jax.models import DTConfig, init_params

    cfg = DTConfig.multi_task([("hopper", 11, 3), ("halfcheetah", 17, 6), ("walker2d", 17, 6)],
                              hidden_size=512, n_layer=3, n_head=4, activation="gelu_new")
    rng = np.random.default_rng(0)
    pre = init_params(cfg, jax.random.key(0))
    models = [jax.tree.map(lambda x: x + jnp.asarray(1e-3 * rng.normal(size=x.shape), jnp.float32), P.trunk(pre))
              for _ in range(3)]
    # raw Fisher entries of ~1e-9 (squared gradients of a trained DT), heavy-tailed
    fishers = [jax.tree.map(lambda x: jnp.asarray(rng.gamma(0.3, 3e-9, x.shape), jnp.float32), m) for m in models]
    n = sum(x.size for x in jax.tree.leaves(models[0]))
    return {f"H512 L3 ({n / 1e6:.1f}M trunk entries) P2 blocks": shift(M.stack(models), M.stack(fishers), "blocks"),
            "H512 L3 P1-style attn+mlp": shift(M.stack(models), M.stack(fishers), "attn,mlp")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/quickstart")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cases = study_cases(args.workdir) if os.path.isdir(args.workdir) else {}
    t = time.perf_counter()
    cases |= h512_case()
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    h512_case()
    warm_s = time.perf_counter() - t
    keys = common_keys(warm_s=warm_s, cold_s=cold_s)
    print(f"{'case':44s} {'norm rel_l2':>11s} {'norm max/spr':>12s} {'raw rel_l2':>10s} {'raw max/spr':>11s}")
    for k, v in cases.items():
        print(f"{k:44s} {v['normalized']['rel_l2']:11.4f} {v['normalized']['max_over_spread']:12.4f} "
              f"{v['raw']['rel_l2']:10.4f} {v['raw']['max_over_spread']:11.4f}")
    print(f"the H512 cases (inputs drawn, old and new merges, with and without normalisation): {common_line(keys)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cases | keys, f, indent=1)


if __name__ == "__main__":
    main()
