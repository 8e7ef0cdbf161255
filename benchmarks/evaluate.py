"""Batched closed-loop evaluation against the original protocol (batch-1 PyTorch DT + Gymnasium)
and against an honest batched PyTorch peer.

    python benchmarks/evaluate.py [--episodes 50] [--sequential_episodes 5] [--repeats 2]
                                  [--tasks hopper,halfcheetah,walker2d] [--max_steps 1000]
                                  [--hidden 128 --layers 3 --context 20] [--models DIR]
                                  [--torch_threads auto] [--no_breakdown] [--json PATH]

Workload: hopper, halfcheetah and walker2d x `--episodes` episodes x up to `--max_steps` (1000)
steps, with an H128 L3 K20 1-head relu DT per task (random weights, seed 0; `--hidden`, `--layers`,
`--context` change the shape; timestep embedding before embed_ln so that the very same weights
load into transformers' DecisionTransformerModel through `export_hf`), state stats mean 0 / std 1
and the paper's targets (3600, 12000, 5000; rtg scale 1000).

What is MEASURED, per task, in one process (ours and both peers interleaved, so all see the same
machine load):
- ours: `mdt_jax.evaluate.evaluate(..., executor='native')`. The first call (`cold`) includes
  XLA compilation of the policy for every bucket shape it meets; then `--repeats` warm calls
  (median). The speedups use the warm time, which is what every evaluation after the first costs
  in a process (a merge sweep evaluates many candidates); the cold figures are printed beside it.
  Random-weight hopper and walker2d episodes fall within tens of steps and halfcheetah never
  terminates, so the policy steps counted are the ones our run actually took.
- the original protocol: `gymnasium.make('<Task>-v5')`, one env, the policy transformers'
  PyTorch DecisionTransformerModel (`torch.inference_mode`) at batch 1 with the
  reference's `get_action` loop: a growing history (states normalised as a whole each step,
  actions, rewards, rtg decremented by r / 1000, timesteps), cut to the last K and left-padded with
  zeros plus an attention mask, the last action predicted. `--sequential_episodes` episodes per
  task from the same reset states as ours (Gymnasium's `set_state`); ms per policy step is
  measured over them (policy forward and env step timed apart).
- the batched peer (`Batched`): the same transformers model called once per step on every live
  episode of the task (`--episodes` of them, our reset states), physics from Gymnasium's vector
  env (`gymnasium.vector.SyncVectorEnv` of `gymnasium.make('<Task>-v5')`). Per live episode it
  keeps the last K steps (states normalised, actions, rtg, timesteps) as a padded (live, K, ...)
  batch with an attention mask, and drops finished episodes. Whole runs, `--repeats` of them
  (median), nothing extrapolated. Its actions are checked against the batch-1 peer's on the same
  histories (a recorded short batched run, each episode replayed through the batch-1 `get_action`,
  max |difference| printed; tolerance `CHECK_TOL`).
- torch threads, both peers: `--torch_threads`, by default the faster of 1 and 2 (probed per peer,
  interleaved, on a full window; two spinning threads collapse when other jobs share the cores).
- the float32 matmul peak (jitted 2048 x 2048 `jnp.dot`, median), and a breakdown of our warm
  time: the jitted policy call at each bucket size it used and `env.step` on the batch, each timed
  alone (medians) and multiplied by how many loop steps used it, the rest being host bookkeeping;
  and one more warm run under the XLA profiler, in which the time XLA programs were executing is
  measured inside the run itself (`_common.busy_s`; the rest of that run is physics and host);
  and, at the full batch, what overlapping the physics with the policy could give (`breakdown`'s
  `overlap`: env.step run while a call executes, and the policy split into two half-size lanes).

What is EXTRAPOLATED: the original protocol's total = its measured ms per policy step x the policy
steps our run took (per task, summed), i.e. its time for the same work without running all of it.

`speedup` = original protocol / ours (warm), `speedup_vs_batched` = batched peer / ours (warm);
`--json` carries them with `floor_fraction`, `cold_s` and `warm_s` (`benchmarks/_common.py`).

`--models DIR` adds a trained workload (random-weight episodes end early; trained ones run long):
per task the DT checkpoint DIR/seed_0/dt_common_<task>/model (or DIR/dt_common_<task>/model, or
DIR/<task>), loaded with `mdt_jax.checkpoint.load`, its own normaliser and the paper's target.
The peers run on those weights only where transformers can hold them: `export_hf` needs
`timestep_embedding='before_ln'`, and the project's trained DTs use the merging code's 'after_ln'
order, so for them only ours is timed (JSON `trained`, `speedup` null) while the cross-check and the
peer comparison stay on the random before_ln weights.

FLOP floors (matmul FLOPs only, counted analytically by `analytic_flops`), each x the policy steps
taken / the matmul peak measured beside the task's warm runs (a 2048^2 `jnp.dot` just before each
one; the median), since this machine's speed drifts by tens of percent within minutes:
- `floor_fraction` (the common key): the exact last-token forward on the window (3K-1 tokens, the
  last block for the last state token only), the least an exact policy runs without a cache;
- `floor_fraction_cached`: the step ours runs (`evaluate.policy_step`: block 0's inputs cached per
  token, so its qkv projection of the window is not recomputed), against its own FLOPs;
- the full forward the peers run (3K tokens through every block, every head), printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import busy_s, common_keys, common_line, matmul_peak, traced  # noqa: E402
from mdt_jax import checkpoint, envs, evaluate as ev  # noqa: E402
from mdt_jax.fileio import write_json_atomic  # noqa: E402
from mdt_jax.interop import export_hf  # noqa: E402
from mdt_jax.models import DTConfig, apply, init_params  # noqa: E402

GYM_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
SEED = 0
CHECK_TOL = 1e-4  # max |batched - batch-1| torch action entry allowed on the cross-check


def model(task: str, hidden: int = 128, layers: int = 3, context: int = 20):
    t = envs.get_task(task)
    cfg = DTConfig(state_dim=t.obs_dim, act_dim=t.act_dim, hidden_size=hidden, n_layer=layers, n_head=1,
                   context_len=context, activation="relu", timestep_embedding="before_ln")
    return cfg, init_params(cfg, jax.random.key(0))


def stats_for(task: str) -> ev.TaskStats:
    t = envs.get_task(task)
    return ev.TaskStats(np.zeros(t.obs_dim, np.float32), np.ones(t.obs_dim, np.float32), t.target_return)


def find_model(root: str, task: str) -> str:
    """The checkpoint folder of `task` under a workdir `root`: root/seed_0/dt_common_<task>/model,
    else root/dt_common_<task>/model, else root/<task>/model (benchmarks/trained_workload.py), else
    root/<task> (the first that holds mdt.json)."""
    tries = [os.path.join(root, "seed_0", f"dt_common_{task}", "model"), os.path.join(root, f"dt_common_{task}", "model"),
             os.path.join(root, task, "model"), os.path.join(root, task)]
    for p in tries:
        if os.path.isfile(os.path.join(p, "mdt.json")):
            return p
    raise FileNotFoundError(f"--models: no checkpoint for task {task!r} under {root!r} (looked for mdt.json in {tries})")


def exportable(cfg: DTConfig) -> str | None:
    """None when transformers' DecisionTransformerModel can hold these weights, else why not."""
    if cfg.multi:
        return "a multi-task DT has no transformers equivalent"
    if cfg.timestep_embedding != "before_ln":
        return (f"timestep_embedding={cfg.timestep_embedding!r}: transformers adds the timestep embedding "
                "before embed_ln, so export_hf cannot express these weights")
    if cfg.layer_norm_eps != 1e-5:
        return f"layer_norm_eps={cfg.layer_norm_eps}: transformers' embed_ln uses 1e-5"
    return None


def torch_dt(cfg: DTConfig, params):
    """transformers' DecisionTransformerModel holding our weights (through `export_hf`), eval mode."""
    from transformers import DecisionTransformerModel

    with tempfile.TemporaryDirectory() as d:
        export_hf(cfg, params, os.path.join(d, "hf"))
        return DecisionTransformerModel.from_pretrained(os.path.join(d, "hf")).eval()


def analytic_flops(cfg: DTConfig, outputs: str) -> int:
    """Matmul FLOPs (2 per multiply-add) of one policy step of one episode: 'last' (the exact
    last-token forward on the window: 3K-1 tokens, the last block for the last state token only),
    'cached' (what ours runs, `evaluate.policy_step`: the step's tokens embedded and projected by
    block 0's c_attn twice (before and after the action), block 0 from the cache on the 3K tokens
    of the ring, the last block for the state token only) or 'all' (the full forward the peers
    run: 3K tokens through every block, every head)."""
    H, K, L, S, A, I = cfg.hidden_size, cfg.context_len, cfg.n_layer, cfg.state_dim, cfg.act_dim, cfg.inner_dim
    embed = 2 * K * H * (S + A + 1)
    rest = lambda T: 2 * T * H * (H + 2 * I) + 4 * T * T * H  # proj, mlp; q.k and p.v
    block = lambda T: 2 * T * H * 3 * H + rest(T)  # with qkv
    one = lambda T: 2 * H * (H + 2 * I) + 4 * T * H + 2 * H * A  # proj and mlp of one token, its attention, the head
    if outputs == "all":
        T = 3 * K
        return embed + L * block(T) + 2 * K * H * (A + S + 1)
    if outputs == "cached":
        T = 3 * K
        tokens = 2 * (2 * H * (S + A + 1) + 2 * 3 * H * 3 * H)
        if L == 1:
            return tokens + one(T)
        return tokens + rest(T) + (L - 2) * block(T) + 2 * T * H * 2 * H + 2 * H * H + one(T)
    T = 3 * K - 1
    last = 2 * T * H * 2 * H + 2 * H * H + one(T)  # k, v of all; q and the rest of one token
    return embed + (L - 1) * block(T) + last


def xla_flops(cfg: DTConfig, params, batch: int = 1) -> float:
    """XLA's FLOPs of the exact last-token forward (`apply(..., outputs='last')`) on `batch`
    windows: the least an exact policy step runs without a cache."""
    K, b = cfg.context_len, batch
    x = (jnp.zeros((b, K, cfg.state_dim)), jnp.zeros((b, K, cfg.act_dim)), jnp.zeros((b, K, 1)),
         jnp.zeros((b, K), jnp.int32), jnp.ones((b, K)))
    cost = jax.jit(lambda p, *a: apply(cfg, p, *a, outputs="last")).lower(params, *x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def pick_threads(torch, forward_ms, threads: str, calls: int = 30, rounds: int = 3) -> tuple[int, dict]:
    """`threads` an int, or 'auto': the faster of 1 and 2 torch threads for `forward_ms(calls)`, timed
    interleaved. On a shared 2-core machine two spinning torch threads can be many times slower
    than one."""
    options = [1, 2] if threads == "auto" else [int(threads)]
    probe = {n: [] for n in options}
    for _ in range(rounds):
        for n in options:
            torch.set_num_threads(n)
            probe[n].append(forward_ms(calls))
    probe = {n: statistics.median(v) for n, v in probe.items()}
    return min(probe, key=probe.get), probe


class Sequential:
    """The original protocol for one task: transformers' DT at batch 1 on one Gymnasium env."""

    def __init__(self, task: str, starts, cfg: DTConfig, dt, stats: ev.TaskStats, max_steps: int):
        import gymnasium as gym
        import torch

        self.torch, self.task, self.starts, self.cfg, self.dt = torch, envs.get_task(task), starts, cfg, dt
        self.max_steps = min(max_steps, self.task.max_episode_steps)
        self.env = gym.make(GYM_IDS[task])
        self.mean, self.std = torch.from_numpy(stats.state_mean), torch.from_numpy(stats.state_std)
        self.target, self.scale = stats.target_return, stats.rtg_scale
        self.policy_s = self.env_s = 0.0
        self.steps, self.returns, self.threads = 0, {}, 1

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

    def forward_ms(self, calls: int) -> float:
        """Median ms of one get_action on a full window."""
        torch, K, S, A = self.torch, self.cfg.context_len, self.cfg.state_dim, self.cfg.act_dim
        x = (torch.randn(K, S), torch.zeros(K, A), torch.zeros(K), torch.ones(1, K), torch.arange(K).reshape(1, K))
        with torch.inference_mode():
            return 1e3 * median_time(lambda: self.get_action(*x), calls)

    def set_threads(self, threads: str) -> dict:
        """Probe 1 and 2 torch threads (or take `threads`); also warms the model up."""
        self.threads, probe = pick_threads(self.torch, self.forward_ms, threads)
        return probe

    def episode(self, e: int) -> None:
        torch, S, A = self.torch, self.cfg.state_dim, self.cfg.act_dim
        torch.set_num_threads(self.threads)
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
            for t in range(self.max_steps):
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

    def replay(self, obs, rewards, actions) -> float:
        """Max |action| difference between this batch-1 loop and `actions` (T, A) taken on the
        history obs (T, S) (raw, obs[t] seen at step t) / rewards (T,): the batch-1 `get_action`
        on the growing history each step, as `episode` builds it."""
        torch, S, A = self.torch, self.cfg.state_dim, self.cfg.act_dim
        torch.set_num_threads(self.threads)
        states = torch.from_numpy(np.asarray(obs[:1])).reshape(1, S).float()
        acts, rews = torch.zeros((0, A)), torch.zeros(0)
        target_return = torch.tensor(self.target / self.scale).reshape(1, 1)
        timesteps = torch.zeros((1, 1), dtype=torch.long)
        worst = 0.0
        with torch.inference_mode():
            for t in range(len(actions)):
                acts = torch.cat([acts, torch.zeros((1, A))], dim=0)
                rews = torch.cat([rews, torch.zeros(1)])
                a = self.get_action((states - self.mean) / self.std, acts, rews, target_return, timesteps)
                worst = max(worst, float(np.abs(a.numpy() - actions[t]).max()))
                acts[-1] = torch.from_numpy(np.asarray(actions[t], np.float32))  # the batched run's action
                if t + 1 < len(obs):
                    states = torch.cat([states, torch.from_numpy(np.asarray(obs[t + 1])).reshape(1, S).float()], 0)
                rews[-1] = float(rewards[t])
                target_return = torch.cat([target_return, (target_return[0, -1] - float(rewards[t]) / self.scale)
                                           .reshape(1, 1)], 1)
                timesteps = torch.cat([timesteps, torch.full((1, 1), t + 1, dtype=torch.long)], dim=1)
        return worst


class Batched:
    """An honest batched peer for one task: transformers' DT called once per step on every live
    episode, physics from Gymnasium's `SyncVectorEnv` of `gym.make('<Task>-v5')` envs.

    Per live episode it keeps the last K steps (states normalised, actions, rtg, timesteps) as a
    (live, K, ...) batch, zeros on the left before step K with the attention mask marking them;
    all episodes start together, so one mask row serves every episode. Each step shifts the window
    by one, calls the model once under `torch.inference_mode()` and drops the episodes that ended.
    The vector env steps all of its envs (finished ones get zero actions and are auto-reset, as
    Gymnasium's default NEXT_STEP mode does; their rows are ignored), as our NativeBatchEnv does.
    """

    def __init__(self, task: str, starts, cfg: DTConfig, dt, stats: ev.TaskStats, episodes: int, max_steps: int):
        import gymnasium as gym
        import torch

        self.torch, self.task, self.cfg, self.dt, self.E = torch, envs.get_task(task), cfg, dt, episodes
        self.starts = (starts[0][:episodes], starts[1][:episodes])
        self.max_steps = min(max_steps, self.task.max_episode_steps)
        self.vec = gym.vector.SyncVectorEnv([lambda: gym.make(GYM_IDS[task]) for _ in range(episodes)])
        self.mean, self.std = torch.from_numpy(stats.state_mean), torch.from_numpy(stats.state_std)
        self.rtg0, self.scale = stats.target_return / stats.rtg_scale, stats.rtg_scale
        self.threads = 1

    def forward_ms(self, calls: int) -> float:
        """Median ms of one model call on all `episodes` full windows."""
        torch, n, K, S, A = self.torch, self.E, self.cfg.context_len, self.cfg.state_dim, self.cfg.act_dim
        x = dict(states=torch.randn(n, K, S), actions=torch.zeros(n, K, A), returns_to_go=torch.zeros(n, K, 1),
                 timesteps=torch.arange(K).repeat(n, 1), attention_mask=torch.ones(n, K, dtype=torch.long))
        with torch.inference_mode():
            return 1e3 * median_time(lambda: self.dt(**x, return_dict=False), calls)

    def set_threads(self, threads: str) -> dict:
        self.threads, probe = pick_threads(self.torch, self.forward_ms, threads, calls=5)
        return probe

    def reset(self) -> np.ndarray:
        self.vec.reset(seed=SEED)
        for e, env in enumerate(self.vec.envs):  # our reset state e
            env.unwrapped.set_state(self.starts[0][e], self.starts[1][e])
        return np.stack([env.unwrapped._get_obs() for env in self.vec.envs])

    def run(self, record: bool = False) -> dict:
        """All episodes, timed (policy = the model call plus the window bookkeeping; env = vec.step).
        `record` keeps each episode's obs, rewards and actions for `Sequential.replay`."""
        torch, E, K, S, A = self.torch, self.E, self.cfg.context_len, self.cfg.state_dim, self.cfg.act_dim
        torch.set_num_threads(self.threads)
        clock = time.perf_counter
        obs = self.reset()
        live = np.arange(E)  # env index of each row
        s, a = torch.zeros(E, K, S), torch.zeros(E, K, A)
        r, ts = torch.zeros(E, K, 1), torch.zeros(E, K, dtype=torch.long)
        mask = torch.zeros(1, K, dtype=torch.long)
        rtg = torch.full((E,), self.rtg0)
        ret, length = np.zeros(E), np.zeros(E, np.int64)
        full = np.zeros((E, self.task.act_dim), np.float32)
        trace = [{"obs": [obs[e]], "rewards": [], "actions": []} for e in range(E)] if record else None
        policy_s = env_s = 0.0
        calls = 0
        with torch.inference_mode():
            for t in range(self.max_steps):
                t0 = clock()
                n = len(live)
                new_s = (torch.from_numpy(obs[live]).float() - self.mean) / self.std
                s = torch.cat([s[:, 1:], new_s[:, None]], 1)
                a = torch.cat([a[:, 1:], torch.zeros(n, 1, A)], 1)
                r = torch.cat([r[:, 1:], rtg[:, None, None]], 1)
                ts = torch.cat([ts[:, 1:], torch.full((n, 1), min(t, self.cfg.max_ep_len - 1), dtype=torch.long)], 1)
                mask = torch.cat([mask[:, 1:], torch.ones(1, 1, dtype=torch.long)], 1)
                _, preds, _ = self.dt(states=s, actions=a, returns_to_go=r, timesteps=ts,
                                      attention_mask=mask.expand(n, K), return_dict=False)
                act = preds[:, -1]
                a[:, -1] = act
                full[:] = 0.0
                full[live] = act.numpy()
                calls += 1
                t1 = clock()
                obs, rew, term, trunc, _ = self.vec.step(full)
                t2 = clock()
                rew_live = rew[live]
                ret[live] += rew_live
                length[live] += 1
                if record:
                    for i, e in enumerate(live):
                        trace[e]["actions"].append(full[e].copy())
                        trace[e]["rewards"].append(rew_live[i])
                        trace[e]["obs"].append(obs[e])
                rtg = rtg - torch.from_numpy(rew_live / self.scale).float()
                keep = ~(term[live] | trunc[live])
                if not keep.all():  # drop the finished episodes
                    k = torch.from_numpy(np.flatnonzero(keep))
                    live, s, a, r, ts, rtg = live[keep], s[k], a[k], r[k], ts[k], rtg[k]
                policy_s += t1 - t0 + clock() - t2
                env_s += t2 - t1
                if not len(live):
                    break
        return {"returns": ret, "lengths": length, "policy_s": policy_s, "env_s": env_s, "s": policy_s + env_s,
                "loop_steps": calls, "trace": trace}


def cross_check(task: str, cfg: DTConfig, dt, stats: ev.TaskStats, episodes: int, steps: int, threads: int,
                replayed: int = 4) -> dict:
    """The batched torch peer's actions against the batch-1 peer's (the same weights) for the same
    histories: a short batched run of all `episodes` (the benchmark's batch, so its rounding) is
    recorded, then the first `replayed` episodes' histories are replayed through the batch-1
    `get_action`. Returns the max |difference| over every action entry and step."""
    starts = ev.reset_states(envs.get_task(task), episodes, SEED)
    b = Batched(task, starts, cfg, dt, stats, episodes, steps)
    b.threads = threads
    out = b.run(record=True)
    seq = Sequential(task, starts, cfg, dt, stats, steps)
    seq.threads = threads
    trace = out["trace"][:replayed]
    diffs = [seq.replay(tr["obs"], tr["rewards"], tr["actions"]) for tr in trace]
    return {"batch": episodes, "episodes": len(trace), "steps": sum(len(tr["actions"]) for tr in trace),
            "max_abs_diff": max(diffs), "tol": CHECK_TOL, "ok": bool(max(diffs) <= CHECK_TOL)}


def median_time(f, n: int) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def our_run(cfg: DTConfig, params, task: str, st: ev.TaskStats, episodes: int, max_steps: int) -> ev.TaskResult:
    """Ours: one task's batched evaluation, the native executor."""
    return ev.evaluate(cfg, params, [task], {task: st}, episodes=episodes, max_steps=max_steps, seed=SEED,
                       executor="native")[0]


def breakdown(cfg, params, task: str, st: ev.TaskStats, E: int, max_steps: int, lengths: np.ndarray,
              calls: int = 5) -> dict:
    """Our warm time split into policy calls (per bucket size), env.step and the rest, estimated
    from each part timed alone (median) x the number of loop steps that ran it; and one more warm
    run under the XLA profiler, measuring inside the run how long XLA programs were executing
    (`_common.busy_s`): the rest of that run is physics, host bookkeeping and dispatch.

    `overlap`: what overlapping the physics with the policy could give, at the full batch of E
    episodes (medians of `10 * calls` interleaved rounds): `call_then_env_ms`, the call then `env.step` as the loop runs
    them; `env_during_call_ms`, `env.step` run while the call executes (dispatched, read after);
    `two_halves_ms`, the policy work of the loop split into two lanes of E/2 episodes, each half's
    call dispatched before either is read (a lane's physics could then run during the other's
    call). A two-lane loop's step costs at least `two_halves_ms` + (`env_during_call_ms` - the
    call alone): both halves' calls, plus what the physics still adds when it shares the CPU with a
    call; `two_lane_bound` = `call_then_env_ms` / that, the most such a loop could gain."""
    T = int(lengths.max())
    live = (lengths[0][None, :] > np.arange(T)[:, None]).sum(1)  # live episodes at each step
    buckets = np.asarray([ev.bucket(int(n), E) for n in live])
    stacked = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * 2), params)  # one candidate, as _NativeDT runs it
    obs, rtg = np.zeros((2, E, cfg.state_dim), np.float32), np.zeros((2, E), np.float32)
    boxes = {}

    def dispatch(b):  # one policy call on a carried b-row cache, not waited for
        box = boxes.setdefault(b, [ev.TokenCache.zeros((2, b), cfg)])
        a, box[0] = ev.native_step(cfg, False, stacked, box[0], obs[:, :b], rtg[:, :b], np.int32(500), None,
                                   np.int32(1), np.zeros(2, np.int32))
        return a

    policy = {b: (int((buckets == b).sum()), median_time(lambda: np.asarray(dispatch(b)), calls))
              for b in sorted(set(buckets.tolist()))}
    env = envs.NativeBatchEnv(task, E)
    env.reset(0)
    a = np.random.default_rng(0).uniform(-1, 1, (E, cfg.act_dim))
    env_ms = 1e3 * median_time(lambda: env.step(a), 3 * calls)
    halves = ((E + 1) // 2, E // 2)
    variants = {"call_ms": lambda: np.asarray(dispatch(E)),
                "call_then_env_ms": lambda: (np.asarray(dispatch(E)), env.step(a)),
                "env_during_call_ms": lambda: (lambda x: (env.step(a), np.asarray(x)))(dispatch(E)),
                "two_halves_ms": lambda: [np.asarray(x) for x in [dispatch(h) for h in halves if h]]}
    times = {k: [] for k in variants}
    for f in variants.values():
        f()
    for _ in range(10 * calls):  # interleaved rounds: this machine's speed drifts within seconds
        for k, f in variants.items():
            t = time.perf_counter()
            f()
            times[k].append(1e3 * (time.perf_counter() - t))
    overlap = {k: statistics.median(v) for k, v in times.items()} | {"env_step_ms": env_ms, "halves": list(halves)}
    call_ms, during, two = overlap["call_ms"], overlap["env_during_call_ms"], overlap["two_halves_ms"]
    overlap["two_lane_bound"] = overlap["call_then_env_ms"] / (two + max(0.0, during - call_ms))
    wall, events = traced(lambda: our_run(cfg, params, task, st, E, max_steps))
    return {"loop_steps": T, "policy_s": sum(n * s for n, s in policy.values()), "env_step_s": env_ms * T / 1e3,
            "policy_ms_per_call": {str(b): 1e3 * s for b, (n, s) in policy.items()},
            "steps_per_bucket": {str(b): n for b, (n, s) in policy.items()}, "overlap": overlap,
            "traced_s": wall, "traced_xla_busy_s": busy_s(events)}


def bench_task(task: str, cfg: DTConfig, params, st: ev.TaskStats, args, peers: bool) -> dict:
    """One task: ours cold then `--repeats` warm, interleaved with the batch-1 peer's episodes and the
    batched peer's runs (`peers`: the weights load into transformers), so all see the same load."""
    E = args.episodes
    run = lambda: our_run(cfg, params, task, st, E, args.max_steps)
    t0 = time.perf_counter()
    res = run()
    cold = time.perf_counter() - t0
    r = {"model": {"hidden_size": cfg.hidden_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                   "context_len": cfg.context_len, "timestep_embedding": cfg.timestep_embedding},
         "batched_cold_s": cold, "flops_last": analytic_flops(cfg, "last"), "flops_full": analytic_flops(cfg, "all"),
         "flops_cached": analytic_flops(cfg, "cached"),
         "xla_flops_last": xla_flops(cfg, params)}
    if peers:
        starts = ev.reset_states(envs.get_task(task), max(E, args.sequential_episodes), SEED)
        if args.sequential_episodes > E:  # episode starts depend on the batch size
            starts = ev.reset_states(envs.get_task(task), args.sequential_episodes, SEED)
        dt = torch_dt(cfg, params)
        seq = Sequential(task, starts, cfg, dt, st, args.max_steps)  # the same reset states as our episodes 0, 1, ...
        probe = seq.set_threads(args.torch_threads)  # also warms the torch model up
        bat = Batched(task, ev.reset_states(envs.get_task(task), E, SEED), cfg, dt, st, E, args.max_steps)
        probe_b = bat.set_threads(args.torch_threads)
        r["check"] = cross_check(task, cfg, dt, st, E, min(args.max_steps, 2 * cfg.context_len + 5), bat.threads)
    warm, warm_cpu, seq_cpu, bruns, bat_cpu, peaks = [], [], 0.0, [], [], []
    episodes = list(range(args.sequential_episodes))
    for i in range(args.repeats):  # interleave: a share of the batch-1 episodes, a warm run of ours, the batched peer
        if peers:
            c0 = time.process_time()
            for e in episodes[i::args.repeats]:
                seq.episode(e)
            seq_cpu += time.process_time() - c0
        peaks.append(matmul_peak(repeats=5))  # this machine's speed drifts: the floor uses the peak beside each run
        t0, c0 = time.perf_counter(), time.process_time()
        again = run()
        warm.append(time.perf_counter() - t0)
        warm_cpu.append(time.process_time() - c0)
        assert np.array_equal(again.returns, res.returns), "batched evaluation is not deterministic"
        if peers:
            c0 = time.process_time()
            bruns.append(bat.run())
            bat_cpu.append(time.process_time() - c0)
    steps = int(res.lengths.sum())
    r |= {"policy_steps": steps, "batched_s": statistics.median(warm), "batched_runs_s": warm,
          "peak_gflops": statistics.median(peaks), "peaks_gflops": peaks,
          "batched_cpu_s": statistics.median(warm_cpu), "compile_s_approx": cold - statistics.median(warm),
          "return_mean": float(res.returns.mean()), "length_mean": float(res.lengths.mean()),
          "lengths": res.lengths[0].tolist(),
          "normalized": float(envs.normalized_score(task, res.returns.mean()))}
    if not peers:
        return r
    ms = 1e3 * (seq.policy_s + seq.env_s) / seq.steps
    b = sorted(bruns, key=lambda x: x["s"])[len(bruns) // 2]  # the median run (upper median for an even count)
    rel = lambda x, y: abs(x - y) / max(abs(y), 1)
    r |= {"torch_threads": seq.threads, "torch_forward_ms_by_threads": {str(n): v for n, v in probe.items()},
          "sequential_cpu_ms_per_step": 1e3 * seq_cpu / seq.steps,
          "sequential_steps_measured": seq.steps, "sequential_measured_s": seq.policy_s + seq.env_s,
          "sequential_ms_per_step": ms, "sequential_policy_ms_per_step": 1e3 * seq.policy_s / seq.steps,
          "sequential_env_ms_per_step": 1e3 * seq.env_s / seq.steps, "sequential_s": ms * steps / 1e3,
          "sequential_return_max_rel_diff": max((rel(seq.returns[e], res.returns[0, e]) for e in seq.returns if e < E),
                                                default=None),
          "torch_batched_threads": bat.threads,
          "torch_batched_forward_ms_by_threads": {str(n): v for n, v in probe_b.items()},
          "torch_batched_s": b["s"], "torch_batched_runs_s": [x["s"] for x in bruns],
          "torch_batched_policy_s": b["policy_s"], "torch_batched_env_s": b["env_s"],
          "torch_batched_cpu_s": statistics.median(bat_cpu),
          "torch_batched_policy_steps": int(b["lengths"].sum()), "torch_batched_loop_steps": b["loop_steps"],
          "torch_batched_return_max_rel_diff": max(rel(x, y) for x, y in zip(b["returns"], res.returns[0]))}
    return r


def totals(rows: list[dict], peers: bool) -> dict:
    """Sums over tasks and the common keys (`benchmarks/_common.py`). Each task's FLOP floor is at
    the matmul peak measured beside its warm runs (the median of those peaks)."""
    tot = lambda k: sum(r[k] for r in rows)
    steps, batched, cold = tot("policy_steps"), tot("batched_s"), tot("batched_cold_s")
    at_peak = lambda k: sum(r[k] * r["policy_steps"] / (r["peak_gflops"] * 1e9) for r in rows)
    floor, floor_full, floor_cached = at_peak("flops_last"), at_peak("flops_full"), at_peak("flops_cached")
    out = {"policy_steps": steps, "batched_s": batched, "batched_cold_s": cold, "policy_steps_per_s": steps / batched,
           "floor_s": floor, "floor_full_s": floor_full, "floor_cached_s": floor_cached,
           "floor_fraction_cached": floor_cached / batched, "batched_cpu_s": tot("batched_cpu_s"),
           "floor_efficiency": floor / batched}
    seq_s = bat_s = None
    if peers:
        seq_s, bat_s = tot("sequential_s"), tot("torch_batched_s")
        out |= {"sequential_s": seq_s, "torch_batched_s": bat_s,
                "sequential_ms_per_step": 1e3 * tot("sequential_measured_s") / tot("sequential_steps_measured"),
                "speedup_cold": seq_s / cold, "speedup_vs_batched_cold": bat_s / cold,
                "sequential_cpu_s": sum(r["sequential_cpu_ms_per_step"] * r["policy_steps"] for r in rows) / 1e3,
                "torch_batched_cpu_s": tot("torch_batched_cpu_s"),
                "torch_batched_policy_steps": tot("torch_batched_policy_steps"),
                "check_max_abs_diff": max(r["check"]["max_abs_diff"] for r in rows),
                "check_ok": all(r["check"]["ok"] for r in rows)}
    return out | common_keys(warm_s=batched, cold_s=cold, peer_s=seq_s, batched_peer_s=bat_s, floor_s=floor)


def print_table(out: dict, peers: bool) -> None:
    f = lambda x, fmt, unit="": "-" if x is None else format(x, fmt) + unit
    print(f"{'task':12} {'policy':>7} {'ours s':>7} {'cold s':>7} {'orig ms/step':>12} {'(policy+env)':>13} "
          f"{'orig s':>7} {'batched s':>9} {'(policy+env)':>13} {'speedup':>7} {'vs batched':>10} {'floor s':>7}")
    for task, r in out["tasks"].items():
        print(f"{task:12} {r['policy_steps']:7d} {r['batched_s']:7.2f} {r['batched_cold_s']:7.2f} "
              + (f"{r['sequential_ms_per_step']:12.2f} {r['sequential_policy_ms_per_step']:6.2f}+"
                 f"{r['sequential_env_ms_per_step']:<6.3f} {r['sequential_s']:7.1f} {r['torch_batched_s']:9.2f} "
                 f"{r['torch_batched_policy_s']:6.2f}+{r['torch_batched_env_s']:<6.2f} "
                 f"{r['sequential_s'] / r['batched_s']:6.1f}x {r['torch_batched_s'] / r['batched_s']:9.2f}x "
                 if peers else f"{'-':>12} {'-':>13} {'-':>7} {'-':>9} {'-':>13} {'-':>7} {'-':>10} ")
              + f"{r['flops_last'] * r['policy_steps'] / (r['peak_gflops'] * 1e9):7.2f}")
    print(f"{'total':12} {out['policy_steps']:7d} {out['batched_s']:7.2f} {out['batched_cold_s']:7.2f} "
          f"{f(out.get('sequential_ms_per_step'), '12.2f'):>12} {'':13} {f(out.get('sequential_s'), '7.1f'):>7} "
          f"{f(out.get('torch_batched_s'), '9.2f'):>9} {'':13} {f(out['speedup'], '6.1f', 'x'):>7} "
          f"{f(out['speedup_vs_batched'], '9.2f', 'x'):>10} {out['floor_s']:7.2f}")
    print(common_line(out))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=50, help="episodes per task for ours and the batched peer")
    ap.add_argument("--sequential_episodes", type=int, default=5, help="episodes per task for the original protocol")
    ap.add_argument("--repeats", type=int, default=2, help="warm runs of ours and runs of the batched peer (median)")
    ap.add_argument("--tasks", default="hopper,halfcheetah,walker2d")
    ap.add_argument("--max_steps", type=int, default=1000, help="cap on the steps of every episode (all sides)")
    ap.add_argument("--hidden", type=int, default=128, help="random-weight model: hidden size")
    ap.add_argument("--layers", type=int, default=3, help="random-weight model: layers")
    ap.add_argument("--context", type=int, default=20, help="random-weight model: context K")
    ap.add_argument("--models", default=None,
                    help="a workdir of trained DTs (DIR/seed_0/dt_common_<task>/model, DIR/dt_common_<task>/model "
                         "or DIR/<task>): also time ours on them; the peers run on them only when transformers "
                         "can hold their weights (timestep_embedding='before_ln')")
    ap.add_argument("--torch_threads", default="auto",
                    help="torch.set_num_threads for both torch peers; 'auto': the faster of 1 and 2, "
                         "probed per task and peer (two threads collapse when other jobs share the 2 cores)")
    ap.add_argument("--no_breakdown", action="store_true", help="skip timing the parts of our loop")
    ap.add_argument("--json", default=None, help="write the figures here (refused if the file exists)")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    if unknown := set(tasks) - set(GYM_IDS):
        ap.error(f"unknown tasks {sorted(unknown)}; choose from {sorted(GYM_IDS)}")
    if min(args.episodes, args.sequential_episodes, args.repeats, args.max_steps, args.hidden, args.layers,
           args.context) < 1:
        ap.error("--episodes, --sequential_episodes, --repeats, --max_steps, --hidden, --layers and --context "
                 "must be >= 1")
    if args.torch_threads != "auto" and not (args.torch_threads.isdigit() and int(args.torch_threads) >= 1):
        ap.error(f"--torch_threads must be 'auto' or a positive int, got {args.torch_threads!r}")
    if args.json and os.path.exists(args.json):
        ap.error(f"--json: {args.json} exists; give a new path")
    trained = {}
    if args.models:
        try:
            trained = {t: find_model(args.models, t) for t in tasks}
        except FileNotFoundError as e:
            ap.error(str(e))

    peak = matmul_peak()
    out = {"peak_gflops": peak, "episodes": args.episodes, "sequential_episodes": args.sequential_episodes,
           "repeats": args.repeats, "max_steps": args.max_steps, "torch_threads": args.torch_threads,
           "batched_peer_physics": "gymnasium.vector.SyncVectorEnv of gymnasium.make('<Task>-v5')",
           "load_avg_1min_start": os.getloadavg()[0], "tasks": {}}
    for task in tasks:
        cfg, params = model(task, args.hidden, args.layers, args.context)
        st = stats_for(task)
        r = bench_task(task, cfg, params, st, args, peers=True)
        if not args.no_breakdown:
            r["breakdown"] = breakdown(cfg, params, task, st, args.episodes, args.max_steps, np.asarray([r["lengths"]]))
        out["tasks"][task] = r
    out |= totals(list(out["tasks"].values()), True)
    out["load_avg_1min"] = os.getloadavg()[0]

    used = ", ".join(f"{t}: {r['torch_threads']}/{r['torch_batched_threads']}" for t, r in out["tasks"].items())
    peaks = ", ".join(f"{t} {r['peak_gflops']:.0f}" for t, r in out["tasks"].items())
    print(f"float32 matmul peak {peak:.0f} GFLOP/s at the start, beside the warm runs {peaks} (jnp.dot 2048^2, "
          f"median); H{args.hidden} L{args.layers} "
          f"K{args.context} 1 head relu, random weights; ours and the batched peer {args.episodes} episodes/task, "
          f"original protocol {args.sequential_episodes} episodes/task, <= {args.max_steps} steps; torch threads "
          f"{args.torch_threads} (batch-1/batched: {used})")
    print_table(out, True)
    print("measured: ours (warm: median of --repeats; cold: first call, compilation included), the batched torch peer "
          "(median of --repeats whole runs: transformers' DT on all live episodes + Gymnasium SyncVectorEnv), the "
          "original protocol's ms/step over its episodes, the peak; extrapolated: 'orig s' = orig ms/step x our "
          "policy steps")
    for task, r in out["tasks"].items():
        c = r["check"]
        print(f"  {task:12} batched (batch {c['batch']}) vs batch-1 torch actions on the same histories "
              f"({c['episodes']} episodes, "
              f"{c['steps']} steps): max |diff| {c['max_abs_diff']:.2e} ({'ok' if c['ok'] else 'FAILED'}, tol "
              f"{c['tol']:.0e}); returns vs ours: batch-1 max rel diff {r['sequential_return_max_rel_diff']:.2g}, "
              f"batched {r['torch_batched_return_max_rel_diff']:.2g} ({r['torch_batched_policy_steps']} policy steps)")
    print(f"process CPU seconds (all threads; robust to other jobs on the machine): ours {out['batched_cpu_s']:.1f} s, "
          f"batched peer {out['torch_batched_cpu_s']:.1f} s, original protocol {out['sequential_cpu_s']:.1f} s "
          f"(extrapolated); 1-min load average {out['load_avg_1min_start']:.1f} at the start, "
          f"{out['load_avg_1min']:.1f} at the end, on {os.cpu_count()} CPUs")
    steps = out["policy_steps"]
    mflop = lambda k: sum(r[k] * r["policy_steps"] for r in out["tasks"].values()) / steps / 1e6
    print(f"ours: {out['policy_steps_per_s']:.0f} policy-steps/s warm; speedup {out['speedup']:.1f}x warm, "
          f"{out['speedup_cold']:.1f}x cold; vs batched {out['speedup_vs_batched']:.2f}x warm, "
          f"{out['speedup_vs_batched_cold']:.2f}x cold. FLOP floors at the peak measured beside each task's runs: "
          f"the exact last-token forward ({mflop('flops_last'):.1f} MFLOP/step) {out['floor_s']:.1f} s = "
          f"{100 * out['floor_fraction']:.0f}% of our warm time; the cached step ours runs "
          f"({mflop('flops_cached'):.1f} MFLOP/step) {out['floor_cached_s']:.1f} s = "
          f"{100 * out['floor_fraction_cached']:.0f}%; the full forward the peers run ({mflop('flops_full'):.1f} "
          f"MFLOP/step) {out['floor_full_s']:.1f} s")
    if not args.no_breakdown:
        for task, r in out["tasks"].items():
            b = r["breakdown"]
            calls = ", ".join(f"b{k}: {b['steps_per_bucket'][k]} x {v:.2f} ms" for k, v in b["policy_ms_per_call"].items())
            print(f"  {task:12} ours {r['batched_s']:.2f} s ~ policy {b['policy_s']:.2f} s ({calls}) + env.step "
                  f"{b['env_step_s']:.2f} s + rest {r['batched_s'] - b['policy_s'] - b['env_step_s']:.2f} s; "
                  f"compile ~{r['compile_s_approx']:.1f} s; a traced warm run: XLA busy {b['traced_xla_busy_s']:.2f} s "
                  f"of {b['traced_s']:.2f} s ({b['traced_xla_busy_s'] / b['traced_s']:.0%}), the rest physics and host")
            o = b["overlap"]
            print(f"  {'':12} overlap at {args.episodes} episodes: call {o['call_ms']:.2f} ms then env.step "
                  f"{o['env_step_ms']:.2f} ms: {o['call_then_env_ms']:.2f} ms; env.step during the call "
                  f"{o['env_during_call_ms']:.2f} ms; two calls of {o['halves'][0]}/{o['halves'][1]} episodes "
                  f"{o['two_halves_ms']:.2f} ms; a two-lane loop gains at most {o['two_lane_bound']:.2f}x")

    if trained:
        rows = {}
        for task, path in trained.items():
            m = checkpoint.load(path)
            why = exportable(m.cfg)
            st = ev.TaskStats.of(m.norm(task), envs.target_return(task))
            rows[task] = bench_task(task, m.cfg, m.params, st, args, peers=why is None) | {
                "path": os.path.abspath(path), "peers_skipped": why}
        peers = all(r["peers_skipped"] is None for r in rows.values())
        out["trained"] = {"models": os.path.abspath(args.models), "tasks": rows} | totals(list(rows.values()), peers)
        print(f"trained DTs from {args.models}:")
        for task, r in rows.items():
            mc = r["model"]
            print(f"  {task:12} H{mc['hidden_size']} L{mc['n_layer']} K{mc['context_len']} {mc['n_head']} head(s), "
                  f"timestep_embedding={mc['timestep_embedding']}: {r['policy_steps']} policy steps (mean length "
                  f"{r['length_mean']:.0f}), mean return {r['return_mean']:.1f} (normalized {r['normalized']:.1f}); "
                  + ("peers run on these weights" if r["peers_skipped"] is None
                     else f"ours only: {r['peers_skipped']}"))
        print_table(out["trained"], peers)
    if args.json:
        write_json_atomic(args.json, out, overwrite=False)
    return out


if __name__ == "__main__":
    main()
