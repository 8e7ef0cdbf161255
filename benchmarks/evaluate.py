"""Batched closed-loop evaluation against the original protocol (batch-1 PyTorch DT + Gymnasium).

    python benchmarks/evaluate.py [--episodes 50] [--sequential_episodes 3] [--json PATH]

Workload: hopper, halfcheetah and walker2d x `--episodes` episodes x up to 1000 steps, with an
H128 L3 K20 relu policy (random weights; timestep embedding before embed_ln so that the very same
weights load into transformers' DecisionTransformerModel through `export_hf`).

- ours: `mdt_jax.evaluate.evaluate(..., executor='native')` over the three tasks in one call,
  timed twice: the first call includes compilation, the second is warm (the speedup uses it);
- the original protocol: `gymnasium.make('<Task>-v5')` stepped one env at a time, the policy the
  PyTorch DT at batch 1 (`--torch_threads`, default 1) with a growing history cut to the last K steps and zero padding (the
  reference's get_action loop), `--sequential_episodes` per task; its ms per policy step is
  measured and multiplied by the number of policy steps our run took (random-weight hopper and
  walker2d episodes end early; halfcheetah never terminates), which is the extrapolated total;
- the FLOP floor: XLA's FLOP count of one policy step of our `outputs='last'` forward, times the
  policy steps, over a float32 matmul peak measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import matmul_peak  # noqa: E402
from mdt_jax import envs, evaluate as ev  # noqa: E402
from mdt_jax.interop import export_hf  # noqa: E402
from mdt_jax.models import DTConfig, apply, init_params  # noqa: E402

GYM_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}


def model(task: str):
    t = envs.get_task(task)
    cfg = DTConfig(state_dim=t.obs_dim, act_dim=t.act_dim, timestep_embedding="before_ln")
    return cfg, init_params(cfg, jax.random.key(0))


def sequential_ms_per_step(task: str, episodes: int, threads: int) -> tuple[float, int]:
    """The reference protocol with transformers' DT and Gymnasium; returns (ms/step, steps)."""
    import gymnasium as gym
    import torch
    from transformers import DecisionTransformerModel

    torch.set_num_threads(threads)
    cfg, params = model(task)
    with tempfile.TemporaryDirectory() as d:
        export_hf(cfg, params, os.path.join(d, "hf"))
        dt = DecisionTransformerModel.from_pretrained(os.path.join(d, "hf")).eval()
    K, S, A = cfg.context_len, cfg.state_dim, cfg.act_dim
    env = gym.make(GYM_IDS[task])
    target = envs.target_return(task) / 1000.0
    steps, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for e in range(episodes):
            obs, _ = env.reset(seed=e)
            states = torch.from_numpy(obs).float().reshape(1, S)
            actions = torch.zeros((0, A))
            rtg = torch.tensor([[target]])
            ts = torch.zeros((1,), dtype=torch.long)
            for t in range(1000):
                actions = torch.cat([actions, torch.zeros((1, A))])
                s, a, r, tt = states[-K:], actions[-K:], rtg[0, -K:], ts[-K:]
                L = s.shape[0]
                pad = lambda x: torch.cat([torch.zeros((K - L,) + x.shape[1:], dtype=x.dtype), x])[None]
                mask = torch.cat([torch.zeros(K - L), torch.ones(L)]).long()[None]
                _, act, _ = dt(states=pad(s), actions=pad(a), returns_to_go=pad(r.reshape(-1, 1)),
                               timesteps=pad(tt), attention_mask=mask, return_dict=False)
                act = act[0, -1]
                actions[-1] = act
                obs, rew, term, trunc, _ = env.step(act.numpy())
                steps += 1
                states = torch.cat([states, torch.from_numpy(obs).float().reshape(1, S)])
                rtg = torch.cat([rtg, (rtg[0, -1] - rew / 1000.0).reshape(1, 1)], dim=1)
                ts = torch.cat([ts, torch.tensor([t + 1])])
                if term or trunc:
                    break
    return 1e3 * (time.perf_counter() - t0) / steps, steps


def policy_flops(task: str) -> float:
    cfg, params = model(task)
    K = cfg.context_len
    x = (jnp.zeros((1, K, cfg.state_dim)), jnp.zeros((1, K, cfg.act_dim)), jnp.zeros((1, K, 1)),
         jnp.zeros((1, K), jnp.int32), jnp.ones((1, K)))
    f = jax.jit(lambda p, *a: apply(cfg, p, *a, outputs="last"))
    cost = f.lower(params, *x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--sequential_episodes", type=int, default=3)
    ap.add_argument("--tasks", default="hopper,halfcheetah,walker2d")
    ap.add_argument("--torch_threads", type=int, default=1,
                    help="threads for the batch-1 PyTorch policy (a batch-1 forward gains nothing from more, "
                         "and spinning threads collapse when the machine is shared)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    peak = matmul_peak()
    out = {"peak_gflops": peak, "tasks": {}}
    steps_total = 0
    batched_cold = batched_warm = 0.0
    seq_total = floor = 0.0
    for task in tasks:
        cfg, params = model(task)
        t = envs.get_task(task)
        stats = {task: ev.TaskStats(np.zeros(t.obs_dim), np.ones(t.obs_dim), t.target_return)}
        t0 = time.perf_counter()
        ev.evaluate(cfg, params, [task], stats, episodes=args.episodes, executor="native")
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = ev.evaluate(cfg, params, [task], stats, episodes=args.episodes, executor="native")[0]
        warm = time.perf_counter() - t0
        steps = int(res.lengths.sum())
        ms, seq_steps = sequential_ms_per_step(task, args.sequential_episodes, args.torch_threads)
        fl = policy_flops(task)
        out["tasks"][task] = {"policy_steps": steps, "batched_cold_s": cold, "batched_s": warm,
                              "sequential_ms_per_step": ms, "sequential_steps_measured": seq_steps,
                              "sequential_s": ms * steps / 1e3, "flops_per_policy_step": fl}
        steps_total += steps
        batched_cold += cold
        batched_warm += warm
        seq_total += ms * steps / 1e3
        floor += fl * steps / (peak * 1e9)
    out |= {"batched_s": batched_warm, "batched_cold_s": batched_cold, "sequential_s": seq_total,
            "speedup": seq_total / batched_warm, "policy_steps": steps_total,
            "policy_steps_per_s": steps_total / batched_warm, "floor_s": floor}
    print(f"float32 matmul peak: {peak:.0f} GFLOP/s; {args.episodes} episodes per task, H128 L3 K20, random weights")
    print(f"{'task':12} {'policy steps':>12} {'ours s':>7} {'(cold)':>7} {'seq ms/step':>11} {'seq s (extrap.)':>15}")
    for task, r in out["tasks"].items():
        print(f"{task:12} {r['policy_steps']:12d} {r['batched_s']:7.1f} {r['batched_cold_s']:7.1f} "
              f"{r['sequential_ms_per_step']:11.2f} {r['sequential_s']:15.1f}")
    print(f"total: ours {batched_warm:.1f} s (cold {batched_cold:.1f} s), original protocol {seq_total:.1f} s "
          f"(extrapolated from measured ms/step), speedup {out['speedup']:.1f}x, "
          f"{out['policy_steps_per_s']:.0f} policy-steps/s, FLOP floor {floor:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
