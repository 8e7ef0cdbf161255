"""One DT training step: ours (JAX, fused scan) against transformers' PyTorch DecisionTransformerModel.

    python benchmarks/train_step.py [--repeats 7] [--steps 20] [--only h128|h512] [--json PATH]

Both sides run a full step (forward, masked action MSE, backward, clip 0.25, AdamW 1e-4/1e-4) in
train mode (dropout 0.1) on the same shapes, K=20, batch 64: H128 L3 1 head relu (the paper's
single-task DT) and H512 L3 4 heads gelu_new (its multi-task size). Batches are drawn by a random
index gather from a fixed pool of 4096 segments on both sides (the same cost for both). JAX times
`--steps` steps fused in one `lax.scan` call, divided by `--steps`; torch times `--steps` Python
steps. The two are interleaved (JAX, torch, JAX, ...) so both see the same machine load; medians
over `--repeats`; cold is our first call (compilation included). GFLOP/s uses XLA's own FLOP count of our step (`cost_analysis`) against a
float32 matmul peak (jitted 2048x2048 `jnp.dot`) measured in the same run. `--json` carries, per
shape and summed over the shapes, the common keys (`benchmarks/_common.py`: `speedup` = torch /
ours, `speedup_vs_batched` null (no batched peer), `floor_fraction`, `cold_s`, `warm_s`, seconds
per call of `--steps` steps).
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

from benchmarks._common import chunk_timer, common_keys, common_line, matmul_peak  # noqa: E402
from mdt_jax import train as T  # noqa: E402
from mdt_jax.models import DTConfig  # noqa: E402

SHAPES = {"h128": dict(hidden_size=128, n_layer=3, n_head=1, activation="relu"),
          "h512": dict(hidden_size=512, n_layer=3, n_head=4, activation="gelu_new")}
S, A, K, B, POOL = 11, 3, 20, 64, 4096


def pool(seed=0):
    r = np.random.default_rng(seed)
    mask = np.ones((POOL, K), np.float32)
    pad = r.integers(0, K // 2, POOL)
    for i, p in enumerate(pad):
        mask[i, :p] = 0
    return {"states": r.normal(size=(POOL, K, S)).astype(np.float32),
            "actions": r.uniform(-1, 1, size=(POOL, K, A)).astype(np.float32),
            "rtg": r.uniform(0, 3.6, size=(POOL, K, 1)).astype(np.float32),
            "timesteps": r.integers(0, 1000, size=(POOL, K)).astype(np.int32), "mask": mask}


def jax_runner(shape: str, steps: int):
    cfg = DTConfig(state_dim=S, act_dim=A, context_len=K, **SHAPES[shape])
    tcfg = T.TrainConfig(batch_size=B, warmup_steps=10_000)
    data = jax.tree.map(jnp.asarray, pool())
    sample = lambda d, k: jax.tree.map(lambda x: x[jax.random.randint(k, (B,), 0, POOL)], d)
    chunk = T.make_train_chunk(cfg, tcfg, sample)
    state = T.init_state(cfg, tcfg, jax.random.key(0))
    one = jax.jit(T.make_train_step(cfg, tcfg, sample))
    cost = one.lower(state, data).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    run, cold_s = chunk_timer(chunk, state, data, steps)
    return run, flops, cold_s


def torch_runner(shape: str, steps: int):
    import torch
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.set_num_threads(2)
    torch.manual_seed(0)
    s = SHAPES[shape]
    cfg = DecisionTransformerConfig(state_dim=S, act_dim=A, hidden_size=s["hidden_size"], n_layer=s["n_layer"],
                                    n_head=s["n_head"], activation_function=s["activation"], max_ep_len=1000,
                                    resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1)
    model = DecisionTransformerModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    data = {k: torch.from_numpy(v) for k, v in pool().items()}
    data["timesteps"] = data["timesteps"].long()
    gen = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, POOL, (B,), generator=gen)
        b = {k: v[idx] for k, v in data.items()}
        mask = b["mask"].long()
        _, preds, _ = model(states=b["states"], actions=b["actions"], returns_to_go=b["rtg"],
                            timesteps=b["timesteps"], attention_mask=mask, return_dict=False)
        sel = mask.reshape(-1) > 0
        loss = torch.mean((preds.reshape(-1, A)[sel] - b["actions"].reshape(-1, A)[sel]) ** 2)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()

    for _ in range(3):
        step()

    def run() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t) / steps

    return run


def bench(shape: str, steps: int, repeats: int, peak: float) -> dict:
    jrun, flops, cold_s = jax_runner(shape, steps)
    trun = torch_runner(shape, steps)
    js, ts = [], []
    for _ in range(repeats):
        js.append(jrun())
        ts.append(trun())
    j, t = statistics.median(js), statistics.median(ts)
    return {"jax_ms": 1e3 * j, "torch_ms": 1e3 * t, "speedup": t / j, "gflop_per_step": flops / 1e9,
            "jax_gflops": flops / j / 1e9, "floor_ms": 1e3 * flops / (peak * 1e9),
            "jax_ms_all": [1e3 * x for x in js], "torch_ms_all": [1e3 * x for x in ts]} | common_keys(
        warm_s=j * steps, cold_s=cold_s, peer_s=t * steps, floor_s=flops / (peak * 1e9) * steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--only", choices=sorted(SHAPES), default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    peak = matmul_peak()
    out = {"peak_gflops": peak}
    print(f"float32 matmul peak (jitted 2048^3 jnp.dot, median): {peak:.0f} GFLOP/s")
    print(f"{'shape':6} {'torch ms':>9} {'jax ms':>8} {'speedup':>8} {'GFLOP/step':>11} {'jax GFLOP/s':>12} "
          f"{'floor ms':>9} {'cold s':>7} {'warm s':>7}")
    for shape in ([args.only] if args.only else list(SHAPES)):
        r = bench(shape, args.steps, args.repeats, peak)
        out[shape] = r
        print(f"{shape:6} {r['torch_ms']:9.1f} {r['jax_ms']:8.1f} {r['speedup']:7.2f}x {r['gflop_per_step']:11.2f} "
              f"{r['jax_gflops']:12.0f} {r['floor_ms']:9.1f} {r['cold_s']:7.2f} {r['warm_s']:7.2f}")
    rows = [v for k, v in out.items() if k in SHAPES]
    tot = lambda k: sum(r[k] for r in rows)
    out |= common_keys(warm_s=tot("warm_s"), cold_s=tot("cold_s"), peer_s=sum(r["torch_ms"] for r in rows) * args.steps / 1e3,
                       floor_s=sum(r["floor_ms"] for r in rows) * args.steps / 1e3)
    print(f"all shapes, one call of --steps each: {common_line(out)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
