"""P1/P2/P3 merge pipelines and the merge CLI, on tiny models."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import checkpoint, merge as M, pipelines as P
from mdt_jax.models import DTConfig, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(hidden_size=16, n_layer=2, context_len=4, max_ep_len=1000)
TASKS = [("hopper", 11, 3), ("walker2d", 17, 6)]


def perturbed(params, seed, scale=0.05):
    """A stand-in finetune: every param moved, except ln_f and the timestep embedding (P2 freezes them)."""
    from mdt_jax import subsets
    frozen = subsets.select(params, "ln_f,timestep")
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x if f else x + scale * jax.random.normal(k, x.shape)
                                     for x, k, f in zip(leaves, keys, jax.tree.leaves(frozen))])


def test_p1_merges_attn_mlp_only_and_keeps_each_tasks_own_rest():
    hop = init_params(DTConfig(state_dim=11, act_dim=3, **SMALL), jax.random.key(0))
    wal = init_params(DTConfig(state_dim=17, act_dim=6, **SMALL), jax.random.key(1))
    mh, mw = P.p1_merge([hop, wal], "average")
    k = ("block_1", "mlp", "c_fc", "kernel")
    get = lambda t, path: t[path[0]][path[1]][path[2]][path[3]]
    np.testing.assert_allclose(get(mh, k), (get(hop, k) + get(wal, k)) / 2, rtol=1e-6)
    np.testing.assert_array_equal(get(mh, k), get(mw, k))
    np.testing.assert_array_equal(mh["block_0"]["ln_1"]["scale"], hop["block_0"]["ln_1"]["scale"])
    np.testing.assert_array_equal(mw["embed_state"]["kernel"], wal["embed_state"]["kernel"])
    np.testing.assert_array_equal(mw["ln_f"]["bias"], wal["ln_f"]["bias"])
    # the frozen part while finetuning is exactly the merged part
    from mdt_jax import subsets
    assert subsets.fraction(P.trunk(hop), subsets.select(P.trunk(hop), P.P1_FREEZE)) == \
        M.merged_fraction(P.trunk(hop), P.P1_SUBSET)


def test_p2_trunk_merged_heads_from_own_finetune_and_fisher_floor():
    cfg = DTConfig.multi_task(TASKS, **SMALL)
    pre = init_params(cfg, jax.random.key(0))
    fts = [perturbed(pre, 1), perturbed(pre, 2)]
    merged = P.p2_merge(cfg, fts, "average")
    np.testing.assert_allclose(merged["block_0"]["attn"]["c_attn"]["kernel"],
                               (fts[0]["block_0"]["attn"]["c_attn"]["kernel"] + fts[1]["block_0"]["attn"]["c_attn"]["kernel"]) / 2,
                               rtol=1e-6)
    np.testing.assert_array_equal(merged["task_hopper"]["embed_state"]["kernel"], fts[0]["task_hopper"]["embed_state"]["kernel"])
    np.testing.assert_array_equal(merged["task_walker2d"]["predict_action"]["kernel"],
                                  fts[1]["task_walker2d"]["predict_action"]["kernel"])
    zeros = [jax.tree.map(jnp.zeros_like, f) for f in fts]
    fm = P.p2_merge(cfg, fts, "fisher", zeros)  # all-zero Fishers: the floor gives the average, not NaN
    for a, b in zip(jax.tree.leaves(fm), jax.tree.leaves(merged)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one finetune per task"):
        P.p2_merge(cfg, fts[:1])


def test_p3_grids_are_stacked_and_consistent():
    cfg = DTConfig.multi_task(TASKS, **SMALL)
    pre = init_params(cfg, jax.random.key(0))
    fts = [perturbed(pre, 1), perturbed(pre, 2)]
    merged = P.p2_merge(cfg, fts, "average")
    grids = P.p3_candidates(cfg, pre, fts, merged, lerp_ps=[0.0, 1.0], ta_lams=[0.5, 1.0], ties_ks=[0.2, 1.0],
                            dare_ps=[0.3], rng=jax.random.key(0))
    assert set(grids) == {"lerp", "task_arithmetic", "ties", "dare_ta"}
    cands, coeffs = grids["task_arithmetic"]
    assert coeffs == [{"lam": 0.5}, {"lam": 1.0}]
    half = jax.tree.map(lambda x: x[0], cands)  # lam = 1/2 over two finetunes is their average
    for a, b in zip(jax.tree.leaves(half), jax.tree.leaves(merged)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    lerp, _ = grids["lerp"]
    np.testing.assert_allclose(lerp["block_0"]["mlp"]["c_fc"]["kernel"][0], pre["block_0"]["mlp"]["c_fc"]["kernel"])
    np.testing.assert_allclose(lerp["block_0"]["mlp"]["c_fc"]["kernel"][1], merged["block_0"]["mlp"]["c_fc"]["kernel"],
                               atol=1e-7)
    ties, tc = grids["ties"]
    assert jax.tree.leaves(ties)[0].shape[0] == len(tc) == 2
    np.testing.assert_array_equal(ties["task_hopper"]["embed_state"]["kernel"][1], fts[0]["task_hopper"]["embed_state"]["kernel"])


def _save_multi(tmp_path, cfg, params, task=None, name="m"):
    stats = {t: {"state_mean": [0.0] * sd, "state_std": [1.0] * sd} for t, sd, _ in TASKS}
    meta = {"tasks": [t for t, _, _ in TASKS], "stats": stats} | ({"task": task} if task else {})
    return str(checkpoint.save(tmp_path / name, params, cfg, meta))


def test_merge_cli_p3_writes_checkpoints_and_json(tmp_path):
    cfg = DTConfig.multi_task(TASKS, **SMALL)
    pre = init_params(cfg, jax.random.key(0))
    base = _save_multi(tmp_path, cfg, pre)
    fts = [_save_multi(tmp_path, cfg, perturbed(pre, i + 1), t, f"ft_{t}") for i, (t, _, _) in enumerate(TASKS)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "launch.merge", "--config=configs/merge.py", "--config.pipeline=p3",
           f"--config.base={base}", f"--config.checkpoints={','.join(reversed(fts))}", "--config.eval.episodes=2",
           "--config.eval.max_steps=10", "--config.lerp_ps=0,1", "--config.ta_lams=0.5", "--config.ties_ks=0.2",
           "--config.dare_ps=0.3", f"--workdir={tmp_path / 'out'}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "out" / "merge.json").read_text())
    models = {row["model"] for row in out["rows"]}
    assert {"p2_average", "pre", "finetune_hopper", "p3_lerp", "p3_ties", "p3_dare_ta"} <= models
    assert set(out["merge"]["p3_best"]) == {"lerp", "task_arithmetic", "ties", "dare_ta"}
    mcfg, mp, meta = checkpoint.load(tmp_path / "out" / "merged")
    assert mcfg == cfg and meta["merge"]["method"] == "average" and meta["merge"]["subset"] == "blocks"
    assert 0 < meta["merge"]["merged_fraction"] < 1
    _, best, bmeta = checkpoint.load(tmp_path / "out" / "p3_ties_best")
    assert bmeta["merge"]["method"] == "ties" and "k" in bmeta["merge"]["coefficients"]
    # the same workdir again is refused, and nothing there is overwritten
    before = (tmp_path / "out" / "merge.json").read_bytes()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "merge.json" in r.stderr
    assert (tmp_path / "out" / "merge.json").read_bytes() == before


@pytest.mark.parametrize("override,needle", [("--config.pipeline=p9", "p9"), ("--config.method=slerp", "slerp"),
                                             ("--config.checkpoints=/nope/a", "at least 2")])
def test_merge_bad_config(tmp_path, override, needle):
    """launch.merge's entry refuses a bad config before writing anything (a ValueError: the CLI's
    exit 2, tests/test_bad_inputs.py)."""
    from cliargs import config_from_args
    from mdt_jax.run import merge_from_config

    config = config_from_args(["--config=configs/merge.py", "--config.checkpoints=/nope/a,/nope/b", override])
    with pytest.raises(ValueError, match=needle):
        merge_from_config(config, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_merge_stages_batch_seeds_and_equal_each_stage_alone(tmp_path):
    """Two seeds' P3 stages run side by side (`merge_stages`): every evaluation of both goes into
    one call per compatible group, fewer calls than the stages alone make, and each stage's
    merge.json is bitwise the one it writes alone."""
    from mdt_jax import evaluate as ev

    cfg = DTConfig.multi_task(TASKS, **SMALL)
    specs, alone, together = [], [], []
    for s in (0, 1):  # each seed its own multi-task model and finetunes
        pre = init_params(cfg, jax.random.key(10 + s))
        base = _save_multi(tmp_path, cfg, pre, name=f"mt{s}")
        fts = [_save_multi(tmp_path, cfg, perturbed(pre, 3 * s + i + 1), t, f"ft{s}_{t}")
               for i, (t, _, _) in enumerate(TASKS)]
        specs.append(P.MergeSpec(pipeline="p3", checkpoints=tuple(fts), base=base, seed=s, select_seed=1000 + s,
                                 eval=ev.EvalSpec(episodes=2, max_steps=40), lerp_ps=(0.0, 1.0), ta_lams=(1.0,),
                                 ties_ks=(0.5,), ties_lams=(1.0,), dare_ps=(0.3,), eval_inputs=True))
        alone.append(str(tmp_path / f"alone{s}"))
        together.append(str(tmp_path / f"together{s}"))
    calls = []
    real = ev.evaluate

    def counted(*a, **k):  # the real evaluator, its calls counted
        calls.append(np.size(k["seed"]))
        return real(*a, **k)

    ev.evaluate = counted
    try:
        for s, w in zip(specs, alone):
            P.merge_stage(s, w)
        n_alone = len(calls)
        calls.clear()
        P.merge_stages(specs, together)
    finally:
        ev.evaluate = real
    assert len(calls) < n_alone and max(calls) > 1, (len(calls), n_alone, calls)
    for a, t in zip(alone, together):
        ja, jt = (json.loads(open(os.path.join(d, "merge.json")).read().replace(d, "<w>")) for d in (a, t))
        assert ja == jt
    with pytest.raises(ValueError, match="one distinct workdir"):
        P.merge_stages(specs, [together[0]] * 2)
