"""Dataset collection: batched native rollouts against a Gymnasium loop with the same policy.

    python benchmarks/collect.py [--task hopper] [--quality expert] [--transitions 1000000]
                                 [--num_envs 64] [--peer_steps 20000] [--policy_dir DIR] [--json PATH]

- ours: `mdt_jax.behaviour.collect.collect` (what `launch.collect` runs, without the HDF5 write):
  `--num_envs` MuJoCo C simulations stepped together, the NumPy actor on the batch, for
  `--transitions` transitions; wall time and transitions/s.
- the peer: `gymnasium.make('<Task>-v5')`, one env, the same NumPy actor at batch 1 (how a
  D4RL-style collector steps a policy), for `--peer_steps` steps; its transitions/s, and its
  time for `--transitions` extrapolated from it.
- the ratio of the two rates. Ours runs `--repeats` times (same seed): the first is `cold_s`, the
  median of the rest `warm_s` (there is nothing to compile: the actor is NumPy); `--json` carries
  the common keys (`benchmarks/_common.py`: `speedup` = the peer's extrapolated time / our warm
  time; `speedup_vs_batched`, `floor_fraction` null) and, as `speedup_first_run`, the ratio this
  benchmark printed before. The policy is the committed behaviour policy of `--quality`
  (`mdt_jax/behaviour/policies/<task>/<quality>`), or uniform random with `--quality random`.

The target (the behaviour-policy issue): 1M transitions in 3 minutes or less on the 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the launchers do (launch/_common.py)
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import common_keys, common_line  # noqa: E402
from mdt_jax import envs  # noqa: E402
from mdt_jax.behaviour import policy as pol  # noqa: E402
from mdt_jax.behaviour.collect import collect, uniform_policy  # noqa: E402

GYM_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}


def make_policy(task: str, quality: str, policy_dir: str = ""):
    if quality == "random" and not policy_dir:
        return uniform_policy(envs.get_task(task).act_dim)
    from mdt_jax.run import behaviour_policy_dir
    cfg, params, _ = pol.load_policy(policy_dir or behaviour_policy_dir(task, quality))
    return pol.numpy_policy(params, std=cfg.std)


def peer_rate(task: str, policy, steps: int, seed: int = 0) -> float:
    import gymnasium as gym
    env = gym.make(GYM_IDS[task])
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    t = time.perf_counter()
    for _ in range(steps):
        act = np.clip(policy(obs[None], rng)[0], -1, 1)
        obs, r, term, trunc, _ = env.step(act)
        if term or trunc:
            obs, _ = env.reset()
    return steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="hopper", choices=sorted(GYM_IDS))
    ap.add_argument("--quality", default="expert", choices=["random", "medium", "expert"])
    ap.add_argument("--transitions", type=int, default=1_000_000)
    ap.add_argument("--num_envs", type=int, default=64)
    ap.add_argument("--peer_steps", type=int, default=20_000)
    ap.add_argument("--policy_dir", default="", help="a policy checkpoint to use instead of the committed one")
    ap.add_argument("--repeats", type=int, default=2, help="runs of ours: the first is cold, the median of the rest warm")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    policy = make_policy(a.task, a.quality, a.policy_dir)
    print(f"collect {a.transitions:,} {a.task}-{a.quality} transitions, {a.num_envs} envs, {os.cpu_count()} CPUs")
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    runs = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        ds = collect(a.task, policy, a.transitions, num_envs=a.num_envs, seed=0)
        runs.append(time.perf_counter() - t)
    ours_s = runs[0]
    warm_s = statistics.median(runs[1:]) if len(runs) > 1 else runs[0]
    ours = a.transitions / ours_s
    peer = peer_rate(a.task, policy, a.peer_steps)
    out = {"task": a.task, "quality": a.quality, "transitions": a.transitions, "num_envs": a.num_envs,
           "ours_s": ours_s, "ours_transitions_per_s": ours, "episodes": ds.metadata["episodes"],
           "return_mean": ds.metadata["return_mean"], "peer_transitions_per_s": peer,
           "peer_extrapolated_s": a.transitions / peer, "speedup_first_run": ours / peer, "ours_runs_s": runs}
    out |= common_keys(warm_s=warm_s, cold_s=ours_s, peer_s=a.transitions / peer)
    print(f"ours (batched native, {a.num_envs} envs): {ours_s:7.1f} s  ({ours:,.0f} transitions/s; "
          f"{ds.metadata['episodes']} episodes, mean return {ds.metadata['return_mean']:.1f})")
    print(f"peer (gymnasium, batch 1)         : {a.transitions / peer:7.1f} s extrapolated "
          f"({peer:,.0f} transitions/s over {a.peer_steps:,} steps)")
    print(f"{common_line(out)} (warm: median of runs 2..{a.repeats}; = the first run with --repeats 1)")
    print(f"speedup of the first run: {ours / peer:.2f}x   target: {a.transitions:,} in <= 180 s: "
          f"{'met' if ours_s <= 180 else 'NOT met'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
