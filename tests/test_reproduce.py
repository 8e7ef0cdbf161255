"""The main job (mdt_jax.reproduce) end to end at tiny scale: schema, figures, cache hits, sanity."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tiny_study
from mdt_jax import checkpoint, reproduce as R, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_FIELDS = {"pipeline", "model", "method", "task", "return_mean", "return_std", "normalized", "episodes", "seeds"}


tiny_config = tiny_study.get_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("repro") / "run")
    t0 = time.perf_counter()
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # the stage log, for the kill test's kill points
        table = R.reproduce(tiny_config(), workdir)
    took = time.perf_counter() - t0
    sys.stdout.write(log.getvalue())
    return workdir, table, took, log.getvalue()


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_results_schema_tables_and_figures(tiny_run):
    workdir, table, _, _ = tiny_run
    with open(os.path.join(workdir, "results.json")) as f:
        res = json.load(f)
    rows = res["rows"]
    assert rows and all(ROW_FIELDS <= set(r) for r in rows)
    for r in rows:
        assert r["task"] in ("hopper", "walker2d") and r["episodes"] == 2 and r["seeds"] == [0]
        assert np.isfinite([r["return_mean"], r["return_std"], r["normalized"]]).all()
    got = {(r["pipeline"], r["method"]) for r in rows}
    want = {("baseline", "uniform"), ("single", "unmerged"), ("p1", "average"), ("p1", "fisher"),
            ("p1", "average+finetune"), ("multi", "pre"), ("multi", "finetuned"), ("p2", "average"),
            ("p2", "fisher"), ("beyond", "emr"), ("beyond", "regmean"), ("beyond", "aligned_average"), ("beyond", "cma_lerp"), ("p3", "lerp"), ("p3", "task_arithmetic"), ("p3", "ties"), ("p3", "dare_ta")}
    assert want <= got, want - got
    assert {r["model"] for r in rows if r["pipeline"] == "p1"} == {"dt_independent", "dt_common", "dt_pretrained",
                                                                    "dt_large"}
    # P3 bests chosen on the selection episodes, reported on the report episodes
    best = [r for r in rows if r["pipeline"] == "p3_best"]
    assert {r["method"] for r in best} == {"lerp", "task_arithmetic", "ties", "dare_ta"}
    assert all(r["selection"] == {"chosen_on_seed": 1000, "reported_on_seed": 0} for r in best)
    assert res["selection"]["select_seeds"] == [1000] and res["selection"]["report_seeds"] == [0]
    assert all(r["checkpoint_mode"] == "last" for r in rows if r["pipeline"] != "baseline")
    assert all(len(r["per_seed_returns"]["0"]) == 2 and np.isfinite(r["v5_normalized"]) for r in rows)
    assert res["estimates"]["methods"] and all("iqm" in m["all"] for m in res["estimates"]["methods"].values())
    assert {r.get("subset") for r in rows if r["pipeline"] == "p1"} == {"attn+mlp", "blocks"}
    # every (model, method, task) appears once, and every model on every task
    keys = [results.row_key(r) for r in rows]
    assert len(keys) == len(set(keys))
    assert {f"C{i}" for i in range(1, 7)} | {"C2_shared_seed", "beyond:emr[mt_finetunes] vs P2 average", "beyond:regmean[dt_common] vs P1 common Fisher"} <= set(res["claims"])
    for c in res["claims"].values():
        assert c["supported"] in (True, False, None) and isinstance(c["evidence"], str) and c["evidence"].strip()
        assert c["ci"][0] <= c["difference"] <= c["ci"][1] and 0 <= c["probability_of_improvement"] <= 1
    assert "pretrained init vs independent" in res["claims"]["C2"]["evidence"]
    assert "not run" not in res["claims"]["C3"]["evidence"]
    with open(os.path.join(workdir, "results.md")) as f:
        md = f.read()
    assert md.strip() == table.strip() and "| random policy |" in md and "| C6 |" in md
    for name in ("results_bars.png", "results_lerp.png", "results_intervals.png", "results_profile.png",
                 "results_lerp_ci.png"):
        path = os.path.join(workdir, name)
        assert _is_png(path) and os.path.getsize(path) > 5000
        import matplotlib.image
        assert matplotlib.image.imread(path).ndim == 3


def test_common_init_shares_the_trunk_and_merges_are_finite(tiny_run):
    workdir, _, _, _ = tiny_run
    sdir = os.path.join(workdir, "seed_0")
    trunk = lambda p: {k: v for k, v in p.items() if k.startswith("block_") or k == "ln_f"}
    common = [checkpoint.load(os.path.join(sdir, f"dt_common_{t}", "model")).params for t in ("hopper", "walker2d")]
    init = lambda t, s: checkpoint.load(os.path.join(sdir, f"dt_{s}_{t}", "model")).metadata["init_seed"]
    assert init("hopper", "common") == init("walker2d", "common") != init("walker2d", "independent")
    assert init("hopper", "independent") != init("walker2d", "independent")
    # one init seed gives one trunk init across tasks of different dims ...
    from mdt_jax.train import init_params_for_seed
    cfgs = [checkpoint.load(os.path.join(sdir, f"dt_common_{t}", "model")).cfg for t in ("hopper", "walker2d")]
    a, b = (trunk(init_params_for_seed(c, init("hopper", "common"))) for c in cfgs)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # ... and trained apart, the common-init trunks stay closer than the independent ones
    dist = lambda a, b: sum(float(np.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(trunk(a)),
                                                                         jax.tree.leaves(trunk(b))))
    indep = [checkpoint.load(os.path.join(sdir, f"dt_independent_{t}", "model")).params for t in ("hopper", "walker2d")]
    assert dist(*common) < 0.5 * dist(*indep)
    merged_dirs = [os.path.join(d, m) for d in sorted(os.listdir(sdir)) if d.startswith(("p1_", "p2_", "p3"))
                   for m in os.listdir(os.path.join(sdir, d)) if m.startswith(("merged", "p3_"))]
    assert len(merged_dirs) >= 9 * 2 + 1 + 4
    # the pretrained set starts from the pretrained multi-task DT's trunk
    pre = checkpoint.load(os.path.join(workdir, "pretrain", "mt", "model")).params
    meta = checkpoint.load(os.path.join(sdir, "dt_pretrained_hopper", "model")).metadata
    assert meta["init_trunk_from"] == os.path.join(os.path.abspath(workdir), "pretrain", "mt", "model")
    from mdt_jax.run import trunk_from_checkpoint
    start = trunk_from_checkpoint(cfgs[0], init_params_for_seed(cfgs[0], 0), os.path.join(workdir, "pretrain", "mt", "model"))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(trunk(start)), jax.tree.leaves(trunk(pre))))
    for rel in merged_dirs:
        params = checkpoint.load(os.path.join(sdir, rel)).params
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), rel
    # every evaluated model's actions were finite at every step (the evaluator counts the others)
    with open(os.path.join(workdir, "results.json")) as f:
        rows = json.load(f)["per_seed_rows"]
    assert rows and all(r["nan_action_steps"] == 0 and np.isfinite(r["return_mean"]) for r in rows)
    # independent-init P1 merging really changed the attn+mlp (the rows are not the unmerged ones again)
    a = checkpoint.load(os.path.join(sdir, "p1_independent_average_attn+mlp", "merged_hopper")).params
    assert not np.allclose(a["block_0"]["mlp"]["c_fc"]["kernel"], indep[0]["block_0"]["mlp"]["c_fc"]["kernel"])
    np.testing.assert_array_equal(a["block_0"]["ln_1"]["scale"], indep[0]["block_0"]["ln_1"]["scale"])


def test_rerun_is_a_cache_hit(tiny_run):
    workdir, table, first, _ = tiny_run
    with open(os.path.join(workdir, "results.json"), "rb") as f:
        before = f.read()
    t0 = time.perf_counter()
    again = R.reproduce(tiny_config(), workdir)
    took = time.perf_counter() - t0
    assert took < max(15.0, 0.25 * first), (took, first)
    assert again == table
    with open(os.path.join(workdir, "results.json"), "rb") as f:
        assert f.read() == before
    other = tiny_config()
    other.train.num_steps = 30
    with pytest.raises(FileExistsError, match="different run"):
        R.reproduce(other, workdir)


def test_claims_follow_the_numbers():
    from mdt_jax import envs

    rng = np.random.default_rng(0)

    def rows(pipeline, model, method, scores, std=1.0, subset=None):
        out = []
        for t, s in zip(("hopper", "walker2d"), scores):
            task = envs.get_task(t)
            ret = task.random_score + (s + std * rng.normal(size=(2, 50))) / 100 * (task.expert_score - task.random_score)
            out.append({"pipeline": pipeline, "model": model, "method": method, "subset": subset, "task": t,
                        "normalized": s, "normalized_std": std, "episodes": 100,
                        "per_seed_returns": {"0": ret[0].tolist(), "1": ret[1].tolist()}})
        return out
    R.BOOTSTRAP["reps"] = 200
    base = rows("baseline", "random", "uniform", [1, 1]) + rows("multi", "mt", "pre", [20, 20])
    good = base + rows("p1", "dt_common", "average", [30, 30], subset="attn+mlp") + \
        rows("p1", "dt_independent", "average", [5, 5], subset="attn+mlp") + \
        rows("p2", "mt_finetunes", "average", [19.9, 20.1], std=5.0)
    c = R.claims(good, ["hopper", "walker2d"], min_effect=0.5)
    assert c["C1"]["supported"] is True and c["C2"]["supported"] is True
    assert c["C2"]["ci"][0] > 20 and c["C1"]["probability_of_improvement"] > 0.99
    assert c["C6"]["supported"] is None and c["C6"]["ci"][0] < 0 < c["C6"]["ci"][1]
    assert c["C3"]["supported"] is None and "not run" in c["C3"]["evidence"]
    bad = base + rows("p1", "dt_common", "average", [0, 0], subset="attn+mlp") + \
        rows("p1", "dt_independent", "average", [5, 5], subset="attn+mlp")
    c = R.claims(bad, ["hopper", "walker2d"])
    assert c["C1"]["supported"] is False and c["C2"]["supported"] is False
    # an effect inside the CI's reach but below claims_min_effect stays undecided
    c = R.claims(good, ["hopper", "walker2d"], min_effect=50.0)
    assert c["C1"]["supported"] is None


@pytest.mark.parametrize("field,value,needle", [
    ("eval.select_seeds", (), "select_seeds: empty"),
    ("eval.select_seeds", (0, 1001), "also report seeds"),
    ("bootstrap_reps", 50, "bootstrap_reps"),
    ("claims_min_effect", -1.0, "claims_min_effect"),
])
def test_study_bad_selection_and_statistics_settings(tmp_path, field, value, needle):
    c = tiny_config()
    c.seeds = (0, 1)
    c.eval.select_seeds = (1000, 1001)
    node, _, leaf = field.rpartition(".")
    (c.eval if node else c)[leaf] = value
    with pytest.raises(ValueError, match=needle):
        R.reproduce(c, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "results.json")


def test_unknown_task_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "launch.reproduce", "--config=configs/quickstart.py",
                        "--config.tasks=hopper,foo", f"--workdir={tmp_path / 'x'}"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2 and "config.tasks: unknown task 'foo'" in r.stderr


def test_single_task_dt_beats_a_uniform_random_policy(tmp_path):
    """Trained on uniform-random data, a DT still beats the uniform-random policy on hopper: its
    actions regress towards the data's mean (near 0), which keeps the hopper upright for longer
    and collects the healthy reward, where random actions topple it in ~20 steps."""
    from mdt_jax import envs, evaluate as ev
    from mdt_jax.run import collect_dataset, train_from_config
    from configs import train as train_cfg

    path = collect_dataset("hopper", "random", 5000, str(tmp_path / "hopper-random.hdf5"), seed=0, num_envs=16)
    c = train_cfg.get_config()
    c.task, c.dataset, c.num_steps, c.steps_per_call, c.checkpoint_every = "hopper", path, 200, 100, 200
    c.model.hidden_size, c.model.n_layer, c.model.context_len = 32, 1, 10
    c.train.batch_size, c.train.learning_rate, c.train.warmup_steps = 32, 1e-3, 20
    model = checkpoint.load(train_from_config(c, str(tmp_path / "dt")))
    cfg, params = model.cfg, model.params
    E = 20
    stats = {"hopper": ev.TaskStats.of(model.norm("hopper"), envs.target_return("hopper"))}
    dt = ev.evaluate(cfg, params, ["hopper"], stats, episodes=E,
                     max_steps=300, seed=1)[0].returns[0]
    rnd = R.random_policy_rows(["hopper"], episodes=E, max_steps=300, seed=1)[0]
    se = np.hypot(dt.std(), rnd["return_std"]) / np.sqrt(E)
    assert dt.mean() > rnd["return_mean"] + 3 * se, (dt.mean(), rnd["return_mean"], se)


# the CLI runs share the tests' persistent compilation cache (conftest.py) with the in-process study
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
           JAX_COMPILATION_CACHE_DIR=os.environ.get("MDT_JAX_CACHE", os.path.join(ROOT, ".jax_cache")))


def _stage_markers(log: str) -> list[str]:
    """The stage lines of a study's log (`[reproduce HH:MM:SS] train dt_common_hopper`), in order,
    less the per-seed and final lines that every run prints."""
    msgs = [ln.split("] ", 1)[1] for ln in log.splitlines() if ln.startswith("[reproduce ")]
    return [m for m in msgs if not m.startswith(("seed ", "done in "))]


def _run_until_killed(cmd, marker: str, delay: float, stderr) -> bool:
    """Start `cmd`; once its log prints the stage line `marker`, wait `delay` s (into the stage) and
    SIGKILL it. Returns whether it was still running when killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)
    for line in proc.stdout:
        if line.startswith("[reproduce ") and line.rstrip("\n").split("] ", 1)[1] == marker:
            time.sleep(delay)
            break
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return alive and proc.returncode == -signal.SIGKILL


def test_study_killed_three_times_then_rerun_gives_the_uninterrupted_results(tiny_run, tmp_path):
    """`launch.reproduce` SIGKILLed at three random points of the tiny study (one stage line drawn
    from each third of the uninterrupted run's stage log, then up to 1.5 s into that stage: mid
    training, mid Fisher, mid evaluation or mid write), rerun after each kill, and run once more to
    completion: results.json and results.md equal the uninterrupted in-process run's. The rows name
    their checkpoints by absolute path, so each run's workdir is replaced by one token first;
    results.json holds no wall-clock field."""
    ref_dir, _, _, log = tiny_run
    markers = _stage_markers(log)
    assert len(markers) >= 30, markers
    rng = np.random.default_rng(0)
    once = [i for i, m in enumerate(markers) if markers.count(m) == 1]  # "train mt" is pretrain/mt and seed_0/mt
    thirds = np.array_split(np.asarray(once), 3)
    points = [(int(rng.choice(part)), float(rng.uniform(0.0, 1.5))) for part in thirds]
    workdir = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "launch.reproduce", "--config=tests/tiny_study.py", f"--workdir={workdir}"]
    with open(tmp_path / "stderr.txt", "w") as err:
        for k, delay in points:
            assert _run_until_killed(cmd, markers[k], delay, err), (markers[k], delay)
            assert not os.path.exists(os.path.join(workdir, "results.json"))
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # the last run redid only the stages from the last kill point on: every earlier one was cached
    rest = _stage_markers(r.stdout)
    assert rest == markers[len(markers) - len(rest):] and len(markers) - len(rest) >= points[-1][0], (points, rest)

    def text(d, name):
        with open(os.path.join(d, name)) as f:
            return f.read().replace(os.path.abspath(d), "<workdir>")
    ref, got = json.loads(text(ref_dir, "results.json")), json.loads(text(workdir, "results.json"))
    assert set(ref) == set(got)
    for key in ref:
        assert got[key] == ref[key], key
    assert text(workdir, "results.md") == text(ref_dir, "results.md")
