"""The accelerator check: one prepared run of the checks that need a GPU, about 8 minutes on an H200.

    bash benchmarks/device_check.sh [--toy] [--out DIR] [--workdir DIR] [--budget SECONDS] [--only a,b]

Steps, in order; each runs in its own process under a time limit, so a failure or a timeout is
reported and the next step still runs:

1. mjx_parity    the mjx executor against the native one (MuJoCo C): hopper and walker2d (toy: hopper) from
                 the same initial state, replaying the actions of a native closed-loop rollout of
                 tests/test_envs.py's joint PD plus noise for 200 steps (toy: 20); max |obs| and
                 |reward| deviation; ok when within test_envs' tolerances.
2. mjx_eval      `mdt_jax.evaluate.evaluate(..., executor="mjx")` of 11 candidates x 150 episodes x
                 1000 steps of a random H128 L3 K20 DT (N(0, 0.02) weights) on hopper (toy: 2 x 4 x
                 50); seconds of the first call (compile) and of a second one (toy: none), env-steps/s
                 (every simulated step, and the live ones: episodes that ended are masked, not cut).
3. grouped_train benchmarks/study.py on the paper's shapes (toy: the quickstart's, few steps):
                 ms/step alone against per model in a vmapped group.
4. study         `python -m launch.reproduce --config=configs/paper.py` shortened by overrides
                 (paper-size models, hopper and walker2d, one seed, few steps and episodes; toy: the
                 tiny settings of tests/test_reproduce.py, smaller still) in WORKDIR/study, given the
                 rest of the budget. The stages are cached, so a rerun with the same --workdir
                 resumes it; a timeout reports how many models and merges were done.

Prints one table (step, status, seconds, key figure) and writes DIR/device_check.json (DIR: --out,
else $OUT, else WORKDIR), refused if it exists. Nothing is written in the repository: the steps
run with WORKDIR (--workdir, else a new temp folder) as their working directory, no bytecode is
written, and JAX's persistent compilation cache lives in --cache (default $JAX_COMPILATION_CACHE_DIR,
else WORKDIR/jax_cache). `--budget` caps the whole run; each step gets the smaller of its own cap
(scaled by budget / default budget when --budget is above the default, so a slow or shared machine
given more time gets it in every step) and what is left.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
STEPS = ("mjx_parity", "mjx_eval", "grouped_train", "study")

# per step: seconds it may take at most (full, toy); the study gets what is left of the budget
CAPS = {"mjx_parity": (60, 120), "mjx_eval": (120, 150), "grouped_train": (150, 120), "study": (600, 600)}
# the full run fits one 600 s device command with room to spare; the toy is ~3.5 minutes on 2 busy
# cores with a warm compilation cache, several times that cold
BUDGET = {False: 540, True: 300}

# the mjx evaluation: candidates, episodes, steps
EVAL = {False: (11, 150, 1000), True: (2, 4, 50)}
PARITY_STEPS = {False: 200, True: 20}
PARITY_TASKS = {False: ("hopper", "walker2d"), True: ("hopper",)}  # MJX compiles for 15-40 s a task on a CPU
# same tolerances as tests/test_envs.py (float32 MJX against float64 MuJoCo C)
PARITY_ATOL = {"obs": 5e-3, "reward": 1e-3}

# the shortened study: overrides of configs/paper.py
# tests/test_reproduce.py::tiny_config on paper.py (its multi-task DT also shrunk to 1 layer), smaller
# still: no pretraining and no P1 finetunes (0 steps switch them off), the large set at the base
# width (the same shapes: compilation cache hits), 20-step episodes. Compilation dominates here.
STUDY_TOY = {
    "tasks": ("hopper", "walker2d"), "seeds": (0,), "data.transitions": 2000, "data.num_envs": 16,
    "train.num_steps": 20, "train.steps_per_call": 10, "train.checkpoint_every": 20, "train.log_every": 10,
    "train.model.hidden_size": 16, "train.model.n_layer": 1, "train.model.context_len": 5,
    "train.train.batch_size": 16, "train.train.warmup_steps": 10, "large.hidden_size": 16,
    "multi.model.hidden_size": 24, "multi.model.n_head": 2, "multi.model.n_layer": 1, "multi.num_steps": 20,
    "multi.batch_size": 16, "multi.finetune_steps": 10, "multi.finetune_train.warmup_steps": 10,
    "p1_finetune.num_steps": 0, "fisher.num_batches": 2, "fisher.batch_size": 16, "merge.lerp_ps": (0, 1),
    "merge.ta_lams": (1,), "merge.ties_ks": (0.5,), "merge.dare_ps": (0.3,), "eval.episodes": 2,
    "eval.max_steps": 20, "eval.select_seeds": (1000,), "pretrain.num_steps": 0, "bootstrap_reps": 200}
STUDY_FULL = {  # the paper's models (H128 L3 K20 B64, large H256, multi-task H512 L3 4 heads), short runs
    "tasks": ("hopper", "walker2d"), "seeds": (0,), "data.transitions": 20_000, "train.num_steps": 500,
    "train.steps_per_call": 250, "train.checkpoint_every": 500, "train.log_every": 250, "train.train.warmup_steps": 100,
    "multi.num_steps": 500, "multi.finetune_steps": 100, "multi.finetune_train.warmup_steps": 20,
    "p1_finetune.num_steps": 100, "fisher.num_batches": 10, "merge.lerp_ps": (0, 0.5, 1), "merge.ta_lams": (0.5, 1),
    "merge.ties_ks": (0.2,), "merge.dare_ps": (0.3,), "eval.episodes": 10, "eval.max_steps": 1000,
    "eval.select_seeds": (1000,), "pretrain.transitions": 20_000, "pretrain.num_steps": 500,
    "bootstrap_reps": 500}


def study_command(toy: bool, workdir: str) -> list[str]:
    from mdt_jax.run import cli_value  # tuples comma-joined, as the command line writes them

    over = STUDY_TOY if toy else STUDY_FULL
    return [sys.executable, "-m", "launch.reproduce", f"--config={os.path.join(ROOT, 'configs', 'paper.py')}",
            f"--workdir={workdir}"] + [f"--config.{k}={cli_value(v)}" for k, v in over.items()]


# ------------------------------------------------------------------------------------ the steps
# Each runs in a child process (`--step NAME --result FILE`) and returns a dict with `figure`
# (the key figure, a string) and any numbers.

def _finite(*xs) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def step_mjx_parity(toy: bool, workdir: str, budget: float) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mdt_jax import envs
    from mdt_jax.envs.mjx import MjxEnv

    n = PARITY_STEPS[toy]
    pd = {"hopper": (2.0, 0.05, 0.1), "walker2d": (2.0, 0.05, 0.1), "halfcheetah": (0.0, 0.0, 0.2)}
    out = {"steps": n, "tasks": {}}
    for i, name in enumerate(PARITY_TASKS[toy]):
        native = envs.NativeBatchEnv(name, 1, nthread=1)
        obs0 = native.reset(i)
        qpos, qvel = native.state()
        kp, kd, noise = pd[name]
        rng = np.random.default_rng(i)
        actions, obs, rew = [], [], []
        for _ in range(n):  # the native rollout, closed loop; mjx replays its actions
            q, v = native.state()
            a = -kp * q[0, 3:] - kd * v[0, 3:] + noise * rng.standard_normal(native.task.act_dim)
            o, r, *_ = native.step(a[None])
            actions.append(a), obs.append(o[0]), rew.append(r[0])
        env = MjxEnv(dataclasses.replace(envs.get_task(name), max_episode_steps=n + 1))

        @jax.jit
        def roll(qpos, qvel, acts):
            st = env.init_state(qpos, qvel)
            def body(st, a):
                st = env.step(st, a)
                return st, (st.obs, st.reward)
            return st.obs, jax.lax.scan(body, st, acts)[1]

        t = time.perf_counter()
        f32 = lambda x: jnp.asarray(np.asarray(x), jnp.float32)
        m_obs0, (m_obs, m_rew) = jax.device_get(roll(f32(qpos[0]), f32(qvel[0]), f32(actions)))
        gap = lambda a, b: float(np.max(np.abs(a - np.asarray(b))))
        dev = {"obs": gap(m_obs, obs), "reward": gap(m_rew, rew), "obs0": gap(m_obs0, obs0[0]),
               "seconds": time.perf_counter() - t}
        dev["ok"] = bool(dev["obs"] <= PARITY_ATOL["obs"] and dev["reward"] <= PARITY_ATOL["reward"])
        out["tasks"][name] = dev
    worst = max(d["obs"] for d in out["tasks"].values())
    worst_r = max(d["reward"] for d in out["tasks"].values())
    out |= {"max_abs_obs": worst, "max_abs_reward": worst_r,
            "figure": f"max |obs| {worst:.1e}, |reward| {worst_r:.1e} over {n} steps x {len(out['tasks'])} tasks"}
    if not all(d["ok"] for d in out["tasks"].values()):
        raise AssertionError(f"mjx deviates from native beyond {PARITY_ATOL}: {out['tasks']}")
    return out


def step_mjx_eval(toy: bool, workdir: str, budget: float) -> dict:
    import jax
    import numpy as np

    from benchmarks.study import synthetic_params
    from mdt_jax.evaluate import TaskStats, evaluate
    from mdt_jax.models import DTConfig

    from mdt_jax import envs

    M, E, steps = EVAL[toy]
    task = envs.get_task("hopper")
    cfg = DTConfig(state_dim=task.obs_dim, act_dim=task.act_dim, hidden_size=128, n_layer=3, n_head=1,
                   context_len=20)
    params = jax.tree.map(lambda *x: jax.numpy.stack(x), *[synthetic_params(cfg, i) for i in range(M)])
    stats = {task.name: TaskStats(np.zeros(task.obs_dim), np.ones(task.obs_dim), task.target_return)}
    runs = []
    # the first call compiles; the second finds the executable in the (persistent) cache, but every
    # evaluate call traces its rollout again, so its time is what each call of a study pays. The
    # toy makes one call: on a CPU the trace alone outlasts its 400 env-steps.
    for _ in range(1 if toy else 2):
        t0 = time.perf_counter()
        res = evaluate(cfg, params, [task.name], stats, episodes=E, max_steps=steps, seed=0, executor="mjx")[0]
        runs.append(time.perf_counter() - t0)
    live = int(np.sum(res.lengths))
    sim = M * E * steps
    ret = np.asarray(res.returns)
    if not np.all(np.isfinite(ret)):
        raise FloatingPointError(f"non-finite returns: {ret}")
    t = runs[-1]
    which = "cold" if len(runs) == 1 else "second"
    return {"candidates": M, "episodes": E, "max_steps": steps, "cold_s": runs[0],
            "warm_s": runs[1] if len(runs) > 1 else None, "simulated_env_steps": sim, "live_env_steps": live,
            "env_steps_per_s": sim / t, "live_env_steps_per_s": live / t, "return_mean": float(ret.mean()),
            "figure": f"{sim / t:,.0f} env-steps/s ({live / t:,.0f} live) in a {which} call of {t:.1f} s; "
                      f"first call {runs[0]:.1f} s"}


def step_grouped_train(toy: bool, workdir: str, budget: float) -> dict:
    sys.path.insert(0, ROOT)
    from benchmarks import study

    which, steps, repeats = ("quickstart", 2, 1) if toy else ("paper", 50, 3)
    kinds = ("single", "multi") if toy else study.KINDS
    out = study.run(which, steps, repeats, kinds=kinds, log=lambda s: print(s, flush=True))
    sh = out["shapes"]
    bad = {k: v["speedup"] for k, v in sh.items() if not _finite(v["speedup"], v["ms_per_step_alone"])}
    if bad:
        raise FloatingPointError(f"non-finite timings: {bad}")
    out["figure"] = ", ".join(f"{k.split('/')[1]} {v['speedup']:.2f}x" for k, v in sh.items())
    out["speedup"] = {k: v["speedup"] for k, v in sh.items()}
    return out


def _study_progress(workdir: str) -> dict:
    done, stages = 0, 0
    for root, dirs, files in os.walk(workdir):
        if os.path.basename(root) == "model" and "mdt.json" in files:
            done += 1
        stages += os.path.basename(root).startswith(("p1", "p2", "p3")) and any(f.endswith(".json") for f in files)
    return {"models_trained": done, "merge_stages": int(stages)}


def step_study(toy: bool, workdir: str, budget: float) -> dict:
    sdir = os.path.join(workdir, "study")
    cmd = study_command(toy, sdir)
    log = os.path.join(workdir, "study.log")
    t0 = time.perf_counter()
    rc = _run_logged(cmd, workdir, log, max(budget - 5, 1), append=True)
    secs = time.perf_counter() - t0
    prog = _study_progress(sdir)
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-2000:]
        why = "timed out" if rc is None else f"exit {rc}"
        raise RuntimeError(f"launch.reproduce {why} after {secs:.0f} s ({prog}); log {log}:\n{tail}")
    with open(os.path.join(sdir, "results.json")) as f:
        res = json.load(f)
    rows = res["rows"]
    bad = [r for r in rows if not _finite(r["return_mean"], r["normalized"])]
    if not rows or bad:
        raise FloatingPointError(f"{len(bad)} of {len(rows)} result rows are not finite")
    decided = sum(c["supported"] is not None for c in res["claims"].values())
    return {"seconds": secs, "rows": len(rows), "claims": len(res["claims"]), "claims_decided": decided,
            "command": " ".join(cmd), **prog,
            "figure": f"{len(rows)} rows, {decided}/{len(res['claims'])} claims decided, "
                      f"{prog['models_trained']} models"}


RUNNERS = {"mjx_parity": step_mjx_parity, "mjx_eval": step_mjx_eval, "grouped_train": step_grouped_train,
           "study": step_study, "environment": lambda toy, workdir, budget: environment()}


# ------------------------------------------------------------------------------------ the driver

def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    # cache every compilation: the study's many small ones (policy buckets, merges) add up
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def _run_logged(cmd: list[str], cwd: str, log: str, timeout: float, append: bool = False) -> int | None:
    """Run `cmd` in its own process group, output to `log`; its exit status, or None when it ran
    past `timeout` (then the group, the processes it started included, is killed)."""
    import signal

    with open(log, "a" if append else "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_child_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:  # whatever it left running (or all of it, on a timeout): the group started here
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def environment() -> dict:
    """What the machine has: backend, devices, versions; the packages the steps import."""
    import importlib
    import platform

    out = {"python": platform.python_version(), "machine": platform.machine()}
    try:
        import jax
        out |= {"jax": jax.__version__, "backend": jax.default_backend(),
                "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()]}
    except Exception as e:  # noqa: BLE001 -- reported, not fatal
        out["jax_error"] = f"{type(e).__name__}: {e}"
    missing = []
    for mod in ("jax", "flax", "optax", "orbax.checkpoint", "mujoco", "mujoco.mjx", "brax", "ml_collections", "absl",
                "h5py", "scipy", "rliable", "evosax", "matplotlib", "tqdm", "gymnasium"):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001
            missing.append(mod)
    out["missing_modules"] = missing
    return out


def run_step(name: str, toy: bool, workdir: str, timeout: float) -> dict:
    """Run one step in a child process with a time limit; never raises."""
    result = os.path.join(workdir, f"step_{name}.json")
    log = os.path.join(workdir, f"step_{name}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "--result", result, "--workdir", workdir,
           "--budget", str(timeout)] + (["--toy"] if toy else [])
    if os.path.exists(result):  # a previous run's, in a reused workdir: never read as this run's
        os.remove(result)
    t0 = time.perf_counter()
    status, err = "ok", None
    rc = _run_logged(cmd, workdir, log, timeout)
    if rc is None:
        status, err = "timeout", f"over its {timeout:.0f} s limit"
    elif rc != 0:
        status = "failed"
    secs = time.perf_counter() - t0
    out = {"name": name, "status": status, "seconds": secs, "log": log}
    if os.path.exists(result):
        with open(result) as f:
            out |= json.load(f)
        out["status"] = status if out.get("error") is None else "failed"
        out["seconds"] = secs
    elif status == "ok":
        out["status"], err = "failed", "the step wrote no result"
    if err and not out.get("error"):
        out["error"] = err
    if out["status"] != "ok" and not out.get("error"):
        with open(log) as f:
            out["error"] = f.read()[-1500:]
    out.setdefault("figure", "-")
    return out


def child(name: str, toy: bool, workdir: str, budget: float, result: str) -> int:
    """The child side: run the step, write its result (or its error) as JSON."""
    import traceback

    from mdt_jax.fileio import write_json_atomic

    try:
        out = RUNNERS[name](toy, workdir, budget)
        rc = 0
    except Exception as e:  # noqa: BLE001 -- the step's failure is its result
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        rc = 1
    write_json_atomic(result, out, overwrite=True)
    return rc


def table(steps: list[dict]) -> str:
    lines = [f"{'step':14} {'status':8} {'seconds':>8}  key figure", "-" * 78]
    for s in steps:
        fig = s["figure"] if s["status"] == "ok" else (s.get("error") or "").strip().splitlines()[-1][:120] \
            if s.get("error") else s["figure"]
        lines.append(f"{s['name']:14} {s['status']:8} {s['seconds']:8.1f}  {fig}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="CPU-sized run of every step")
    ap.add_argument("--out", default=None, help="folder for device_check.json (default $OUT, else the workdir)")
    ap.add_argument("--workdir", default=None, help="where every step works (default: a new temp folder)")
    ap.add_argument("--cache", default=None, help="JAX persistent compilation cache (default "
                                                  "$JAX_COMPILATION_CACHE_DIR, else WORKDIR/jax_cache)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 480; toy 170)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--step", choices=sorted(RUNNERS), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.step:  # child process
        return child(args.step, args.toy, args.workdir, args.budget, args.result)

    budget = BUDGET[args.toy] if args.budget is None else args.budget
    if not budget > 0:
        ap.error(f"--budget must be positive, got {budget}")
    names = list(STEPS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        ap.error(f"--only: unknown steps {bad}; choose from {','.join(STEPS)}")
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="device_check_")
    out_dir = os.path.abspath(args.out or os.environ.get("OUT") or workdir)
    out_path = os.path.join(out_dir, "device_check.json")
    if os.path.exists(out_path):
        ap.error(f"{out_path} exists; give another --out")
    if os.path.commonpath([workdir, ROOT]) == ROOT:
        ap.error(f"--workdir {workdir} is inside the repository; give a folder outside it")
    os.makedirs(workdir, exist_ok=True)
    cache = os.path.abspath(args.cache or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                            or os.path.join(workdir, "jax_cache"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache

    t_start = time.perf_counter()
    # probed in a child too: this process never imports jax, so it holds no accelerator memory
    env = run_step("environment", args.toy, workdir, 120)
    env = {k: v for k, v in env.items() if k not in ("name", "figure", "log")}
    print(f"device check ({'toy' if args.toy else 'full'}): {env.get('backend')} {env.get('devices')}; "
          f"workdir {workdir}; cache {cache}; budget {budget:.0f} s", flush=True)
    if env.get("missing_modules"):
        print(f"missing Python modules: {', '.join(env['missing_modules'])}", flush=True)
    results = []
    for name in names:
        left = budget - (time.perf_counter() - t_start)
        cap = CAPS[name][args.toy] * max(1.0, budget / BUDGET[args.toy])  # a larger budget widens every cap
        timeout = left if name == "study" else min(cap, left)
        if timeout < 5:
            results.append({"name": name, "status": "skipped", "seconds": 0.0, "figure": "-",
                            "error": f"no time left of the {budget:.0f} s budget"})
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} (limit {timeout:.0f} s)", flush=True)
        r = run_step(name, args.toy, workdir, timeout)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {r['status']} in {r['seconds']:.1f} s: "
              f"{r['figure'] if r['status'] == 'ok' else r.get('error', '')[-300:]}", flush=True)
        results.append(r)
    total = time.perf_counter() - t_start
    report = {"toy": args.toy, "budget_s": budget, "total_s": total, "workdir": workdir, "cache": cache,
              "environment": env, "steps": {r["name"]: r for r in results},
              "order": [r["name"] for r in results]}
    from mdt_jax.fileio import write_json_atomic
    write_json_atomic(out_path, report, overwrite=False)
    print(table(results))
    print(f"total {total:.1f} s; wrote {out_path}", flush=True)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
