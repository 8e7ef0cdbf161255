"""Batched closed-loop evaluation against the original protocol (batch-1 PyTorch DT + Gymnasium).

    python benchmarks/evaluate.py [--episodes 50] [--sequential_episodes 5] [--repeats 2]
                                  [--tasks hopper,halfcheetah,walker2d] [--torch_threads auto] [--json PATH]

Workload: hopper, halfcheetah and walker2d x `--episodes` episodes x up to 1000 steps, with an
H128 L3 K20 1-head relu DT per task (random weights, seed 0; timestep embedding before embed_ln so
that the very same weights load into transformers' DecisionTransformerModel through `export_hf`),
state stats mean 0 / std 1 and the paper's targets (3600, 12000, 5000; rtg scale 1000).

What is MEASURED, per task, in one process (ours and the original protocol interleaved, so both
see the same machine load):
- ours: `mdt_jax.evaluate.evaluate(..., executor='native')`. The first call (`cold`) includes
  XLA compilation of the policy for every bucket shape it meets; then `--repeats` warm calls
  (median). The speedup uses the warm time, which is what every evaluation after the first costs in
  a process (a merge sweep evaluates many candidates); the cold figures are printed beside it.
  Random-weight hopper and walker2d episodes fall within tens of steps and halfcheetah never
  terminates, so the policy steps counted are the ones our run actually took.
- the original protocol: `gymnasium.make('<Task>-v5')`, one env, the policy transformers'
  PyTorch DecisionTransformerModel (`torch.inference_mode`) at batch 1 with the
  reference's `get_action` loop: a growing history (states normalised as a whole each step,
  actions, rewards, rtg decremented by r / 1000, timesteps), cut to the last K and left-padded with
  zeros plus an attention mask, the last action predicted. Torch threads: `--torch_threads`, by
  default the faster of 1 and 2 (probed, interleaved, on a full window; two spinning threads
  collapse when other jobs share the cores). `--sequential_episodes` episodes per
  task from the same reset states as ours (Gymnasium's `set_state`); ms per policy step is
  measured over them (policy forward and env step timed apart).
- the float32 matmul peak (jitted 2048 x 2048 `jnp.dot`, median), and a breakdown of our warm
  time: the jitted policy call at each bucket size it used and `env.step` on the batch, each timed
  alone (medians) and multiplied by how many loop steps used it; the rest is host bookkeeping.

What is EXTRAPOLATED: the original protocol's total = its measured ms per policy step x the policy
steps our run took (per task, summed), i.e. its time for the same work without running all of it.

FLOP floors (matmul FLOPs only, counted analytically; XLA's own count of our forward is printed
for comparison): our `outputs='last'` forward (3K-1 tokens, the last block only for the last state
token) and the full forward the original protocol runs (3K tokens through every block, every
head), each x the policy steps taken / the measured peak.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
SEED = 0


def model(task: str):
    t = envs.get_task(task)
    cfg = DTConfig(state_dim=t.obs_dim, act_dim=t.act_dim, hidden_size=128, n_layer=3, n_head=1, context_len=20,
                   activation="relu", timestep_embedding="before_ln")
    return cfg, init_params(cfg, jax.random.key(0))


def stats_for(task: str) -> ev.TaskStats:
    t = envs.get_task(task)
    return ev.TaskStats(np.zeros(t.obs_dim, np.float32), np.ones(t.obs_dim, np.float32), t.target_return)


def analytic_flops(cfg: DTConfig, outputs: str) -> int:
    """Matmul FLOPs (2 per multiply-add) of one batch-1 forward: 'last' (ours) or 'all' (HF)."""
    H, K, L, S, A, I = cfg.hidden_size, cfg.context_len, cfg.n_layer, cfg.state_dim, cfg.act_dim, cfg.inner_dim
    embed = 2 * K * H * (S + A + 1)
    block = lambda T: 2 * T * H * (3 * H + H + 2 * I) + 4 * T * T * H  # qkv, proj, mlp; q.k and p.v
    if outputs == "all":
        T = 3 * K
        return embed + L * block(T) + 2 * K * H * (A + S + 1)
    T = 3 * K - 1
    last = 2 * T * H * 2 * H + 2 * H * (H + H + 2 * I) + 4 * T * H + 2 * H * A  # k, v of all; the rest of one token
    return embed + (L - 1) * block(T) + last


def xla_flops(cfg: DTConfig, params) -> float:
    K = cfg.context_len
    x = (jnp.zeros((1, K, cfg.state_dim)), jnp.zeros((1, K, cfg.act_dim)), jnp.zeros((1, K, 1)),
         jnp.zeros((1, K), jnp.int32), jnp.ones((1, K)))
    cost = jax.jit(lambda p, *a: apply(cfg, p, *a, outputs="last")).lower(params, *x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


class Sequential:
    """The original protocol for one task: transformers' DT at batch 1 on one Gymnasium env."""

    def __init__(self, task: str, starts):
        import gymnasium as gym
        import torch
        from transformers import DecisionTransformerModel

        self.torch, self.task, self.starts = torch, envs.get_task(task), starts
        self.cfg, params = model(task)
        with tempfile.TemporaryDirectory() as d:
            export_hf(self.cfg, params, os.path.join(d, "hf"))
            self.dt = DecisionTransformerModel.from_pretrained(os.path.join(d, "hf")).eval()
        self.env = gym.make(GYM_IDS[task])
        st = stats_for(task)
        self.mean, self.std = torch.from_numpy(st.state_mean), torch.from_numpy(st.state_std)
        self.target, self.scale = st.target_return, st.rtg_scale
        self.policy_s = self.env_s = 0.0
        self.steps, self.returns = 0, {}

    def get_action(self, states, actions, rewards, returns_to_go, timesteps):
        """The reference's get_action: last K steps, left-padded with zeros, masked."""
        torch, K = self.torch, self.cfg.context_len
        S, A = self.cfg.state_dim, self.cfg.act_dim
        states, actions = states.reshape(1, -1, S)[:, -K:], actions.reshape(1, -1, A)[:, -K:]
        returns_to_go, timesteps = returns_to_go.reshape(1, -1, 1)[:, -K:], timesteps.reshape(1, -1)[:, -K:]
        L = states.shape[1]
        mask = torch.cat([torch.zeros(K - L), torch.ones(L)]).to(torch.long).reshape(1, -1)
        states = torch.cat([torch.zeros((1, K - L, S)), states], dim=1).float()
        actions = torch.cat([torch.zeros((1, K - L, A)), actions], dim=1).float()
        returns_to_go = torch.cat([torch.zeros((1, K - L, 1)), returns_to_go], dim=1).float()
        timesteps = torch.cat([torch.zeros((1, K - L), dtype=torch.long), timesteps], dim=1)
        _, action_preds, _ = self.dt(states=states, actions=actions, returns_to_go=returns_to_go,
                                     timesteps=timesteps, attention_mask=mask, return_dict=False)
        return action_preds[0, -1]

    def forward_ms(self, threads: int, calls: int) -> float:
        """Median ms of one get_action on a full window with `threads` torch threads."""
        torch, K, S, A = self.torch, self.cfg.context_len, self.cfg.state_dim, self.cfg.act_dim
        torch.set_num_threads(threads)
        x = (torch.randn(K, S), torch.zeros(K, A), torch.zeros(K), torch.ones(1, K), torch.arange(K).reshape(1, K))
        with torch.inference_mode():
            return 1e3 * median_time(lambda: self.get_action(*x), calls)

    def set_threads(self, threads: str, calls: int = 30, rounds: int = 3) -> dict:
        """`threads` an int, or 'auto': the faster of 1 and 2 threads, timed interleaved. On a shared
        2-core machine two spinning torch threads can be many times slower than one."""
        options = [1, 2] if threads == "auto" else [int(threads)]
        probe = {n: [] for n in options}
        for _ in range(rounds):
            for n in options:
                probe[n].append(self.forward_ms(n, calls))
        probe = {n: statistics.median(v) for n, v in probe.items()}
        self.threads = min(probe, key=probe.get)
        self.torch.set_num_threads(self.threads)
        return probe

    def episode(self, e: int) -> None:
        torch, S, A = self.torch, self.cfg.state_dim, self.cfg.act_dim
        clock = time.perf_counter
        self.env.reset(seed=e)
        self.env.unwrapped.set_state(self.starts[0][e], self.starts[1][e])  # our reset state e
        state = self.env.unwrapped._get_obs()
        states = torch.from_numpy(state).reshape(1, S).float()
        actions, rewards = torch.zeros((0, A)), torch.zeros(0)
        target_return = torch.tensor(self.target / self.scale).reshape(1, 1)
        timesteps = torch.zeros((1, 1), dtype=torch.long)
        ret = 0.0
        with torch.inference_mode():
            for t in range(self.task.max_episode_steps):
                t0 = clock()
                actions = torch.cat([actions, torch.zeros((1, A))], dim=0)
                rewards = torch.cat([rewards, torch.zeros(1)])
                action = self.get_action((states - self.mean) / self.std, actions, rewards, target_return, timesteps)
                actions[-1] = action
                action = action.numpy()
                t1 = clock()
                state, reward, terminated, truncated, _ = self.env.step(action)
                t2 = clock()
                states = torch.cat([states, torch.from_numpy(state).reshape(1, S).float()], dim=0)
                rewards[-1] = reward
                target_return = torch.cat([target_return, (target_return[0, -1] - reward / self.scale).reshape(1, 1)], 1)
                timesteps = torch.cat([timesteps, torch.full((1, 1), t + 1, dtype=torch.long)], dim=1)
                self.policy_s += t1 - t0 + clock() - t2
                self.env_s += t2 - t1
                self.steps += 1
                ret += reward
                if terminated or truncated:
                    break
        self.returns[e] = ret


def median_time(f, n: int) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def breakdown(cfg, params, task: str, E: int, lengths: np.ndarray, calls: int = 5) -> dict:
    """Our warm time split into policy calls (per bucket size), env.step and the rest, estimated
    from each part timed alone (median) x the number of loop steps that ran it."""
    T, K = int(lengths.max()), cfg.context_len
    live = (lengths[0][None, :] > np.arange(T)[:, None]).sum(1)  # live episodes at each step
    buckets = np.asarray([ev.bucket(int(n), E) for n in live])
    stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], params)
    policy = {}
    for b in sorted(set(buckets.tolist())):
        window = [np.zeros((1, b, K, cfg.state_dim), np.float32), np.zeros((1, b, K, cfg.act_dim), np.float32),
                  np.zeros((1, b, K, 1), np.float32), np.full((1, b, K), 500, np.int32)]
        mask = np.ones((b, K), np.float32)
        s = median_time(lambda: np.asarray(ev.native_policy(cfg, False, stacked, window, mask, None)), calls)
        policy[b] = (int((buckets == b).sum()), s)
    env = envs.NativeBatchEnv(task, E)
    env.reset(0)
    a = np.random.default_rng(0).uniform(-1, 1, (E, cfg.act_dim))
    env_s = median_time(lambda: env.step(a), 3 * calls) * T
    return {"loop_steps": T, "policy_s": sum(n * s for n, s in policy.values()), "env_step_s": env_s,
            "policy_ms_per_call": {str(b): 1e3 * s for b, (n, s) in policy.items()},
            "steps_per_bucket": {str(b): n for b, (n, s) in policy.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=50, help="episodes per task for ours")
    ap.add_argument("--sequential_episodes", type=int, default=5, help="episodes per task for the original protocol")
    ap.add_argument("--repeats", type=int, default=2, help="warm runs of ours per task (median)")
    ap.add_argument("--tasks", default="hopper,halfcheetah,walker2d")
    ap.add_argument("--torch_threads", default="auto",
                    help="torch.set_num_threads for the original protocol; 'auto': the faster of 1 and 2, "
                         "probed per task (two threads collapse when other jobs share the 2 cores)")
    ap.add_argument("--no_breakdown", action="store_true", help="skip timing the parts of our loop")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    if unknown := set(tasks) - set(GYM_IDS):
        ap.error(f"unknown tasks {sorted(unknown)}; choose from {sorted(GYM_IDS)}")
    if min(args.episodes, args.sequential_episodes, args.repeats) < 1:
        ap.error("--episodes, --sequential_episodes and --repeats must be >= 1")

    peak = matmul_peak()
    out = {"peak_gflops": peak, "episodes": args.episodes, "sequential_episodes": args.sequential_episodes,
           "torch_threads": args.torch_threads, "tasks": {}}
    for task in tasks:
        cfg, params = model(task)
        st = {task: stats_for(task)}
        run = lambda: ev.evaluate(cfg, params, [task], st, episodes=args.episodes, seed=SEED, executor="native")[0]
        t0 = time.perf_counter()
        res = run()
        cold = time.perf_counter() - t0
        starts = ev.reset_states(envs.get_task(task), max(args.episodes, args.sequential_episodes), SEED)
        if args.sequential_episodes > args.episodes:  # episode starts depend on the batch size
            starts = ev.reset_states(envs.get_task(task), args.sequential_episodes, SEED)
        seq = Sequential(task, starts)  # the same reset states as our episodes 0, 1, ...
        probe = seq.set_threads(args.torch_threads)  # also warms the torch model up
        warm, warm_cpu, seq_cpu, episodes = [], [], 0.0, list(range(args.sequential_episodes))
        for i in range(args.repeats):  # interleave: a share of the sequential episodes, a warm run of ours
            c0 = time.process_time()
            for e in episodes[i::args.repeats]:
                seq.episode(e)
            seq_cpu += time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            again = run()
            warm.append(time.perf_counter() - t0)
            warm_cpu.append(time.process_time() - c0)
            assert np.array_equal(again.returns, res.returns), "batched evaluation is not deterministic"
        steps = int(res.lengths.sum())
        ms = 1e3 * (seq.policy_s + seq.env_s) / seq.steps
        r = {"policy_steps": steps, "torch_threads": seq.threads,
             "torch_forward_ms_by_threads": {str(n): v for n, v in probe.items()}, "batched_cold_s": cold, "batched_s": statistics.median(warm),
             "batched_runs_s": warm, "batched_cpu_s": statistics.median(warm_cpu),
             "sequential_cpu_ms_per_step": 1e3 * seq_cpu / seq.steps, "compile_s_approx": cold - statistics.median(warm),
             "sequential_steps_measured": seq.steps, "sequential_measured_s": seq.policy_s + seq.env_s,
             "sequential_ms_per_step": ms, "sequential_policy_ms_per_step": 1e3 * seq.policy_s / seq.steps,
             "sequential_env_ms_per_step": 1e3 * seq.env_s / seq.steps, "sequential_s": ms * steps / 1e3,
             "flops_last": analytic_flops(cfg, "last"), "flops_full": analytic_flops(cfg, "all"),
             "xla_flops_last": xla_flops(cfg, params),
             "return_mean": float(res.returns.mean()),
             "sequential_return_max_rel_diff": max((abs(seq.returns[e] - res.returns[0, e]) / max(abs(res.returns[0, e]), 1)
                                                    for e in seq.returns if e < args.episodes), default=None)}
        if not args.no_breakdown:
            r["breakdown"] = breakdown(cfg, params, task, args.episodes, res.lengths)
        out["tasks"][task] = r

    rows = out["tasks"].values()
    tot = lambda k: sum(r[k] for r in rows)
    steps, batched, cold, seq_s = tot("policy_steps"), tot("batched_s"), tot("batched_cold_s"), tot("sequential_s")
    floor = sum(r["flops_last"] * r["policy_steps"] for r in rows) / (peak * 1e9)
    floor_full = sum(r["flops_full"] * r["policy_steps"] for r in rows) / (peak * 1e9)
    out |= {"policy_steps": steps, "batched_s": batched, "batched_cold_s": cold, "sequential_s": seq_s,
            "sequential_ms_per_step": 1e3 * tot("sequential_measured_s") / tot("sequential_steps_measured"),
            "speedup": seq_s / batched, "speedup_cold": seq_s / cold, "policy_steps_per_s": steps / batched,
            "floor_s": floor, "floor_full_s": floor_full, "batched_cpu_s": tot("batched_cpu_s"),
            "sequential_cpu_s": sum(r["sequential_cpu_ms_per_step"] * r["policy_steps"] for r in rows) / 1e3,
            "load_avg_1min": os.getloadavg()[0],
            "floor_efficiency": floor / batched}

    used = ", ".join(f"{t}: {r['torch_threads']}" for t, r in out["tasks"].items())
    print(f"float32 matmul peak {peak:.0f} GFLOP/s (jnp.dot 2048^2, median); H128 L3 K20 1 head relu, random weights; "
          f"ours {args.episodes} episodes/task, original protocol {args.sequential_episodes} episodes/task, "
          f"torch threads {args.torch_threads} ({used})")
    print(f"{'task':12} {'policy':>7} {'ours s':>7} {'cold s':>7} {'orig ms/step':>12} {'(policy+env)':>13} "
          f"{'orig s':>7} {'speedup':>7} {'floor s':>7}")
    for task, r in out["tasks"].items():
        print(f"{task:12} {r['policy_steps']:7d} {r['batched_s']:7.2f} {r['batched_cold_s']:7.2f} "
              f"{r['sequential_ms_per_step']:12.2f} {r['sequential_policy_ms_per_step']:6.2f}+{r['sequential_env_ms_per_step']:.3f} "
              f"{r['sequential_s']:7.1f} {r['sequential_s'] / r['batched_s']:6.1f}x "
              f"{r['flops_last'] * r['policy_steps'] / (peak * 1e9):7.2f}")
    print(f"{'total':12} {steps:7d} {batched:7.2f} {cold:7.2f} {out['sequential_ms_per_step']:12.2f} {'':13} "
          f"{seq_s:7.1f} {out['speedup']:6.1f}x {floor:7.2f}")
    print("measured: ours (warm: median of --repeats; cold: first call, compilation included), the original "
          "protocol's ms/step over its episodes, the peak; extrapolated: 'orig s' = orig ms/step x our policy steps")
    print(f"process CPU seconds (all threads; robust to other jobs on the machine): ours {out['batched_cpu_s']:.1f} s, "
          f"original protocol {out['sequential_cpu_s']:.1f} s (extrapolated), ratio "
          f"{out['sequential_cpu_s'] / out['batched_cpu_s']:.1f}x; 1-min load average at the end "
          f"{out['load_avg_1min']:.1f} on {os.cpu_count()} CPUs")
    mflop = lambda k: sum(r[k] * r["policy_steps"] for r in rows) / steps / 1e6
    print(f"ours: {out['policy_steps_per_s']:.0f} policy-steps/s warm; speedup {out['speedup']:.1f}x warm, "
          f"{out['speedup_cold']:.1f}x cold. FLOP floor at peak: ours ('last' forward, {mflop('flops_last'):.1f} "
          f"MFLOP/step) {floor:.1f} s = {100 * floor / batched:.0f}% of our warm time; the full forward the original "
          f"protocol runs ({mflop('flops_full'):.1f} MFLOP/step) {floor_full:.1f} s")
    if not args.no_breakdown:
        for task, r in out["tasks"].items():
            b = r["breakdown"]
            calls = ", ".join(f"b{k}: {b['steps_per_bucket'][k]} x {v:.2f} ms" for k, v in b["policy_ms_per_call"].items())
            print(f"  {task:12} ours {r['batched_s']:.2f} s ~ policy {b['policy_s']:.2f} s ({calls}) + env.step "
                  f"{b['env_step_s']:.2f} s + rest {r['batched_s'] - b['policy_s'] - b['env_step_s']:.2f} s; "
                  f"compile ~{r['compile_s_approx']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
