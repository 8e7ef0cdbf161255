"""CMA-ES search of merge coefficients (mdt_jax/search.py): spaces, the ask/tell loop, resume, bad input."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import evaluate as ev, merge as M, pipelines as P, run, search as S, subsets
from mdt_jax.models import DTConfig
from mdt_jax.models.dt import param_shapes
from test_pipelines import SMALL, _save_multi
from test_resume import _kill_when

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the CLI runs share the tests' persistent compilation cache (conftest.py): the second and third
# runs compile nothing
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
           JAX_COMPILATION_CACHE_DIR=os.environ.get("MDT_JAX_CACHE", os.path.join(ROOT, ".jax_cache")))
TASKS3 = [("hopper", 11, 3), ("walker2d", 17, 6), ("halfcheetah", 17, 6)]


def random_params(cfg, seed):
    """N(0, 0.02) params (LayerNorm scales about 1) in the model's layout, without tracing the model."""
    r = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, s: ((subsets.path_str(p).endswith("scale")) + 0.02 * r.normal(size=s.shape)).astype(np.float32),
        param_shapes(cfg))


def finetune_of(params, seed, scale=0.05):
    """A stand-in finetune: every param moved but ln_f and the timestep embedding (P2 freezes them)."""
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda x, f: x if f else (x + scale * r.normal(size=x.shape)).astype(np.float32),
                        params, subsets.select(params, "ln_f,timestep"))


@pytest.fixture(scope="module")
def models():
    cfg = DTConfig.multi_task(TASKS3, **SMALL)
    pre = random_params(cfg, 0)
    fts = [finetune_of(pre, i + 1) for i in range(3)]
    r = np.random.default_rng(0)
    blocks = lambda t: M.subset_mask(t, "blocks")
    fishers = [jax.tree.map(lambda x, m: (r.gamma(0.5, size=x.shape) * m).astype(np.float32), f, blocks(f))
               for f in fts]
    return cfg, pre, fts, jax.jit(lambda f: P.p2_merge(cfg, f, "average"))(fts), fishers


def _close(a, b, **kw):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **{"rtol": 2e-5, "atol": 2e-6} | kw)


def _plain(method, cfg, pre, fts, merged, fishers):
    """The plain merge each space must give at theta = 0, built from the P2/P3 functions directly."""
    T = len(fts)
    grid = dict(lerp=dict(lerp_ps=[0.5]), task_arithmetic=dict(ta_lams=[1 / T]),
                ties=dict(ties_ks=[0.2], ties_lams=[1.0]),
                dare=dict(dare_ps=[0.3], dare_lam=1 / T, rng=jax.random.key(0)))
    if method == "fisher":
        return jax.jit(lambda f, fi: P.p2_merge(cfg, f, "fisher", fi))(fts, fishers)
    name = {"dare": "dare_ta"}.get(method, method)
    first = lambda p, f, m: jax.tree.map(lambda x: x[0], P.p3_candidates(cfg, p, f, m, **grid[method])[name][0])
    return jax.jit(first)(pre, fts, merged)


@pytest.mark.parametrize("method", S.METHODS)
def test_neutral_theta_is_the_plain_merge_and_groups_act_per_block(models, method):
    cfg, pre, fts, merged, fishers = models
    space = S.make_space(method, cfg, fts, pre=pre, merged=merged, fishers=fishers)
    assert space.groups == ("block_0", "block_1") and space.dim == 2
    neutral = jax.jit(space.merge_fn)(jnp.zeros(2))
    _close(neutral, _plain(method, cfg, pre, fts, merged, fishers))
    _close(jax.jit(space.baseline)(), neutral)
    # vmapped over a population, under jit: candidate i is merge_fn(theta_i)
    thetas = jnp.asarray([[0.0, 0.0], [1.5, 0.0], [-2.0, 3.0]])
    pop = jax.jit(jax.vmap(space.merge_fn))(thetas)
    _close(jax.tree.map(lambda x: x[0], pop), neutral)
    # moving block 0's coordinate moves block 0 only, and every task's heads stay its own finetune's
    one = jax.tree.map(lambda x: x[1], pop)
    assert any(not np.allclose(a, b)
               for a, b in zip(jax.tree.leaves(one["block_0"]), jax.tree.leaves(neutral["block_0"])))
    _close(one["block_1"], jax.tree.map(lambda x: x[0], pop)["block_1"], rtol=0, atol=0)
    for t, name in enumerate(cfg.task_names):
        _close(one[f"task_{name}"], (merged if method == "lerp" else fts[t])[f"task_{name}"], rtol=0, atol=0)
    c = space.coefficients(np.asarray([-40.0, 40.0]))[space.coefficient]
    lo, hi = (0.0, 1.0) if method == "lerp" else (0.0, np.inf)
    assert all(lo <= v <= hi for v in c.values()) and c["block_0"] < space.neutral < c["block_1"]


def test_fisher_temperature_near_zero_is_the_uniform_average(models):
    cfg, pre, fts, merged, fishers = models
    space = S.make_space("fisher", cfg, fts, fishers=fishers)
    _close(jax.jit(space.merge_fn)(jnp.full((2,), -40.0)), merged, rtol=1e-4, atol=1e-5)


def test_groups_by_subset_and_bad_groups(models):
    cfg, pre, fts, merged, _ = models
    space = S.make_space("task_arithmetic", cfg, fts, pre=pre, groups="attn;mlp,ln")
    assert space.groups == ("attn", "mlp,ln")
    assert S.make_space("ties", cfg, fts, pre=pre, groups="one").dim == 1
    with pytest.raises(S.SearchError, match="without a coefficient.*ln_1"):
        S.make_space("task_arithmetic", cfg, fts, pre=pre, groups="attn;mlp")
    with pytest.raises(S.SearchError, match="overlap"):
        S.make_space("task_arithmetic", cfg, fts, pre=pre, groups="attn;block_*")
    with pytest.raises(S.SearchError, match="fishers"):
        S.make_space("fisher", cfg, fts)
    with pytest.raises(S.SearchError, match="p0"):
        S.make_space("lerp", cfg, fts, pre=pre, merged=merged, p0=1.0)
    bad = [jax.tree.map(lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x), fts[0])] + fts[1:]
    with pytest.raises(ValueError, match="non-finite.*finetune\\[hopper\\]"):
        S.make_space("task_arithmetic", cfg, bad, pre=pre)


OPT = np.asarray([0.7, -1.2, 0.3])


def _quadratic(cands):
    return -np.sum((np.asarray(cands["x"]) - OPT) ** 2, axis=1)


def test_cma_es_finds_a_quadratics_optimum_and_resumes_exactly(tmp_path):
    kw = dict(popsize=8, generations=25, sigma0=0.5, seed=3, budget_episodes=10_000, episodes_per_candidate=1,
              progress=False)
    full = S.cma_search(lambda th: {"x": th}, 3, _quadratic, workdir=str(tmp_path / "a"), **kw)
    assert full.generations_run == 25 and full.stopped == "generations" and full.episodes_used == 200
    np.testing.assert_allclose(full.best_theta, OPT, atol=0.03)
    assert full.history[-1]["mean"] > full.history[0]["mean"] + 0.5
    assert full.best_fitness == max(h["best"] for h in full.history)

    calls = []

    def dies_at_gen_5(c):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return _quadratic(c)

    with pytest.raises(KeyboardInterrupt):
        S.cma_search(lambda th: {"x": th}, 3, dies_at_gen_5, workdir=str(tmp_path / "b"), **kw)
    assert len(json.loads((tmp_path / "b" / S.HISTORY_FILE).read_text())["history"]) == 5
    again = S.cma_search(lambda th: {"x": th}, 3, _quadratic, workdir=str(tmp_path / "b"), **kw)
    assert json.dumps(again.to_json()) == json.dumps(full.to_json())
    with pytest.raises(S.SearchError, match="different settings.*sigma0"):
        S.cma_search(lambda th: {"x": th}, 3, _quadratic, workdir=str(tmp_path / "b"), **(kw | {"sigma0": 0.4}))
    # the budget stops the search before the generation that would exceed it
    short = S.cma_search(lambda th: {"x": th}, 3, _quadratic, workdir=str(tmp_path / "c"),
                         **(kw | {"budget_episodes": 8 * 3 * 2 + 7, "episodes_per_candidate": 2}))
    assert short.generations_run == 3 and short.stopped == "budget" and short.episodes_used == 48


def test_budget_below_one_generation_and_shared_seeds_refused_before_anything(tmp_path, models):
    cfg, pre, fts, merged, _ = models
    with pytest.raises(S.SearchError, match="budget_episodes=31 is below one generation.*32"):
        S.cma_search(lambda th: {"x": th}, 3, _quadratic, popsize=8, generations=2, sigma0=0.5, seed=0,
                     workdir=str(tmp_path / "w"), budget_episodes=31, episodes_per_candidate=4)
    stats = {t: ev.TaskStats(np.zeros(sd), np.ones(sd), 1000.0) for t, sd, _ in TASKS3}
    kw = dict(method="task_arithmetic", pre=pre, workdir=str(tmp_path / "w"), popsize=4, episodes=1, max_steps=5)
    with pytest.raises(S.SearchError, match="budget_episodes=11 is below one generation"):
        S.run_search(cfg, fts, stats, budget_episodes=11, **kw)  # 4 candidates x 1 episode x 3 tasks
    with pytest.raises(S.SearchError, match="selection_seed \\[5\\] and report_seed \\[5\\] share"):
        S.run_search(cfg, fts, stats, selection_seed=5, report_seed=5, **kw)
    with pytest.raises(S.SearchError, match="selection_seed \\[1, 2\\] and report_seed \\[2, 3\\] share \\[2\\]"):
        S.run_search(cfg, fts, stats, selection_seed=[1, 2], report_seed=[2, 3], **kw)
    assert not (tmp_path / "w").exists()


def _cli(tmp_path, pre, fts, cfg):
    base = _save_multi(tmp_path, cfg, pre, name="pre")
    cks = [_save_multi(tmp_path, cfg, f, t, f"ft_{t}") for f, (t, _, _) in zip(fts, TASKS3)]
    return [sys.executable, "-m", "launch.search", "--config=configs/search.py", "--config.method=ties",
            f"--config.base={base}", f"--config.checkpoints={','.join(reversed(cks))}", "--config.popsize=4",
            "--config.generations=3", "--config.eval.episodes=1", "--config.eval.report_episodes=2",
            "--config.eval.max_steps=40", "--config.eval.executor=native"]


def test_cli_killed_between_generations_resumes_to_the_uninterrupted_result(tmp_path):
    # two tasks keep this quick; launch.search's entry refuses bad seeds and budgets first, writing
    # nothing (a ValueError-family error: the CLI's exit 2, tests/test_bad_inputs.py)
    from cliargs import config_from_args

    tasks = TASKS3[:2]
    cfg = DTConfig.multi_task(tasks, **SMALL)
    pre = random_params(cfg, 0)
    args = _cli(tmp_path, pre, [finetune_of(pre, i + 1, scale=0.3) for i in range(2)], cfg)
    for bad, needle in [("--config.report_seed=1", "share"), ("--config.budget_episodes=7", "below one generation")]:
        with pytest.raises(S.SearchError, match=needle):
            run.search_from_config(config_from_args(args + [bad]), str(tmp_path / "bad"))
        assert not (tmp_path / "bad").exists()
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(args + [f"--workdir={full}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert _kill_when(args + [f"--workdir={killed}"], lambda: (killed / S.STATE_FILE).exists())
    with np.load(killed / S.STATE_FILE) as z:
        done = z["fitness"].shape[0]
    assert 1 <= done < 3 and not (killed / "search.json").exists()
    subprocess.run(args + [f"--workdir={killed}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    a, b = ((d / "search.json").read_text() for d in (full, killed))
    assert a == b
    out = json.loads(a)
    assert out["result"]["generations_run"] == 3 and len(out["result"]["history"]) == 3
    assert {r["model"] for r in out["rows"]} == {"search_ties", "ties_neutral"}
    assert all(r["selection"] == {"chosen_on": 1, "reported_on": 2} and r["episodes"] == 2 for r in out["rows"])
    assert set(out["result"]["coefficients"]["lam"]) == {"block_0", "block_1"}
    from mdt_jax import checkpoint
    _, best, meta = checkpoint.load(killed / "best")
    assert meta["merge"]["coefficients"] == out["result"]["coefficients"]
