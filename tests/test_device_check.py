"""The accelerator check (benchmarks/device_check.sh) at toy size on CPU, and the grouped-training
benchmark's FLOP count (benchmarks/study.py) against XLA's own."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import device_check as D  # noqa: E402
from benchmarks import study  # noqa: E402
from mdt_jax import train as T  # noqa: E402
from mdt_jax.data import sample_batch, sample_multitask  # noqa: E402
from mdt_jax.models import DTConfig  # noqa: E402


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
               JAX_COMPILATION_CACHE_DIR=os.environ.get("MDT_JAX_CACHE", os.path.join(ROOT, ".jax_cache")))
    env.pop("OUT", None)
    return env


def _git_status():
    """The worktree's status, ignored files included, less this test's own: bytecode of the modules
    it imports and the compilation cache it hands the check; and less Hypothesis's example database
    (.hypothesis/), which test files running alongside on the other pytest-xdist worker create."""
    if not os.path.exists(os.path.join(ROOT, ".git")):
        return None
    cache = os.path.relpath(_env()["JAX_COMPILATION_CACHE_DIR"], ROOT)
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [ln for ln in out.splitlines()
            if "__pycache__" not in ln and not ln[3:].startswith((cache, ".hypothesis/"))]


def _check(tmp_path, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"), *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=1200)


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# The toy study step is the tiny study of tests/test_reproduce.py run through the CLI again (about
# 4 minutes of CI on a cold cache); it runs here only with MDT_JAX_FULL_DEVICE_CHECK=1.
FULL = os.environ.get("MDT_JAX_FULL_DEVICE_CHECK", "") == "1"


def test_toy_run_reports_every_step_ok_and_writes_nothing_in_the_repo(tmp_path):
    before = _git_status()
    out, work = tmp_path / "out", tmp_path / "work"
    steps_run = list(D.STEPS) if FULL else [s for s in D.STEPS if s != "study"]
    # a generous budget: a cold compilation cache on 2 shared cores takes several minutes
    proc = _check(tmp_path, "--toy", "--out", str(out), "--workdir", str(work), "--budget", "1000",
                  "--only", ",".join(steps_run))
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    with open(out / "device_check.json") as f:
        rep = json.load(f)
    assert rep["toy"] is True and rep["order"] == steps_run
    steps = rep["steps"]
    for name in steps_run:
        assert steps[name]["status"] == "ok", (name, steps[name].get("error"))
        assert _finite(steps[name]["seconds"]) and steps[name]["seconds"] > 0
        assert name in proc.stdout  # the table
    par = steps["mjx_parity"]
    assert set(par["tasks"]) == set(D.PARITY_TASKS[True]) and par["steps"] == D.PARITY_STEPS[True]
    assert 0 <= par["max_abs_obs"] <= D.PARITY_ATOL["obs"] and 0 <= par["max_abs_reward"] <= D.PARITY_ATOL["reward"]
    ev = steps["mjx_eval"]
    assert (ev["candidates"], ev["episodes"], ev["max_steps"]) == D.EVAL[True]
    assert ev["simulated_env_steps"] == 2 * 4 * 50 and 0 < ev["live_env_steps"] <= 400
    assert _finite(ev["env_steps_per_s"]) and ev["env_steps_per_s"] > 0 and _finite(ev["return_mean"])
    gt = steps["grouped_train"]["shapes"]
    assert set(gt) == {"quickstart/single", "quickstart/multi"}
    for r in gt.values():
        assert _finite(r["speedup"]) and r["speedup"] > 0
        assert r["recommend"] == ("group" if r["speedup"] > study.GROUP_IF else "alone")
        for k in ("floor_fraction", "cold_s", "warm_s"):
            assert all(_finite(v) and v > 0 for v in r[k].values()), (k, r[k])
        assert 0 < r["floor_fraction"]["alone"] < 1.5  # a fraction of the FLOP floor (the peak is measured, noisy)
    if FULL:
        st = steps["study"]
        assert st["rows"] > 0 and st["claims"] > 0 and st["models_trained"] > 0
        with open(work / "study" / "results.json") as f:
            assert len(json.load(f)["rows"]) == st["rows"]
    assert _git_status() == before  # nothing written in the repository, ignored files included
    # an existing report is never overwritten; refused before any step runs
    again = _check(tmp_path, "--toy", "--out", str(out), "--workdir", str(tmp_path / "w2"))
    assert again.returncode == 2 and "exists" in again.stderr
    assert not (tmp_path / "w2").exists()
    with open(out / "device_check.json") as f:
        assert json.load(f) == rep


@pytest.mark.parametrize("args,msg", [(["--only", "mjx_parity,nope"], "unknown steps"),
                                      (["--budget", "0"], "budget"),
                                      (["--workdir", os.path.join(ROOT, "runs", "dc")], "inside the repository")])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, args, msg):
    proc = _check(tmp_path, "--toy", "--out", str(tmp_path), *args)
    assert proc.returncode == 2 and msg in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "device_check.json") and not os.path.exists(os.path.join(ROOT, "runs", "dc"))


def _xla_flops(cfg, tcfg, sample, data):
    state = T.init_state(cfg, tcfg, jax.random.key(0), params=study.synthetic_params(cfg, 0))
    step = jax.jit(T.make_train_step(cfg, tcfg, sample))
    cost = step.lower(state, data).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("multi", [False, True])
def test_analytic_matmul_flops_match_xla_count(multi):
    """step_flops counts matmuls only; XLA's count adds the elementwise work (LayerNorm, softmax,
    dropout, Adam), so ours must sit a little under it."""
    from mdt_jax.data import segment_data, stack_segment_data
    from synth import make_dataset

    K, B = 10, 8
    tcfg = T.TrainConfig(batch_size=B, warmup_steps=10)
    if multi:
        cfg = DTConfig.multi_task([("a", 11, 3), ("b", 17, 6)], hidden_size=64, n_layer=2, n_head=2, context_len=K)
        data = stack_segment_data([segment_data(make_dataset(state_dim=s, act_dim=a, seed=i), context_len=K)
                                   for i, (s, a) in enumerate([(11, 3), (17, 6)])])
        sample, rows = (lambda d, k: sample_multitask(d, k, B)), 2 * B
    else:
        cfg = DTConfig(state_dim=11, act_dim=3, hidden_size=64, n_layer=2, n_head=2, context_len=K)
        data = segment_data(make_dataset(), context_len=K)
        sample, rows = (lambda d, k: sample_batch(d, k, B)), B
    ours, xla = study.step_flops(cfg, rows), _xla_flops(cfg, tcfg, sample, data)
    assert 0.75 * xla < ours <= xla, (ours, xla, ours / xla)
    # the count is linear in the rows
    assert study.step_flops(cfg, 2 * rows) == pytest.approx(2 * ours)
    assert jnp.isfinite(ours)


@pytest.mark.parametrize("toy", [True, False])
def test_study_overrides_are_fields_of_the_paper_config_and_pass_its_checks(toy):
    from configs import paper
    from mdt_jax.reproduce import check_config

    c = paper.get_config()
    for key, value in (D.STUDY_TOY if toy else D.STUDY_FULL).items():
        *path, leaf = key.split(".")
        node = c
        for p in path:
            node = node[p]
        assert leaf in node, key
        node[leaf] = value  # ml_collections refuses a value of the wrong type
    tasks, seeds = check_config(c)
    assert seeds == [0] and tasks == ["hopper", "walker2d"]
    if not toy:  # the paper's own model sizes stay
        assert (c.train.model.hidden_size, c.train.model.n_layer, c.large.hidden_size) == (128, 3, 256)
        assert (c.multi.model.hidden_size, c.multi.model.n_head) == (512, 4)


def test_benchmark_shapes_are_the_studys():
    shapes = {s.kind: s for s in study.study_shapes("paper")}
    assert set(shapes) == set(study.KINDS)
    one, big, mt, ft = (shapes[k] for k in study.KINDS)
    assert (one.cfg.hidden_size, one.cfg.n_layer, one.cfg.context_len, one.tcfg.batch_size) == (128, 3, 20, 64)
    assert (one.cfg.state_dim, one.cfg.act_dim) == (17, 6)  # padded to the widest task
    assert big.cfg.hidden_size == 256 and one.group == big.group == ft.group == 9  # 3 tasks x 3 seeds
    assert (mt.cfg.hidden_size, mt.cfg.n_head, mt.cfg.activation, mt.group) == (512, 4, "gelu_new", 3)
    assert mt.cfg.task_names == ("hopper", "halfcheetah", "walker2d") and ft.cfg == mt.cfg
    assert ft.tcfg.init_reg == 1e-4 and "ln_f" in ft.tcfg.freeze and mt.tcfg.freeze == ()
    assert [s.group for s in study.study_shapes("quickstart")] == [6, 6, 2, 6]
    assert [s.group for s in study.study_shapes("cpu", group=4)] == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="--shapes"):
        study.study_shapes("tpu")
