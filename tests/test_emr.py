"""EMR-Merging (mdt_jax.emr): a hand computation, invariances, bad inputs, artifacts and the P2 merge entry."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mdt_jax import checkpoint, emr as E, merge as M, subsets
from mdt_jax.models import DTConfig
from mdt_jax.models.dt import param_shapes

SMALL = dict(hidden_size=16, n_layer=1, context_len=4, max_ep_len=1000)
TASKS = [("hopper", 11, 3), ("walker2d", 17, 6)]
F32 = lambda x: np.asarray(x, np.float32)


def hand_case():
    """3 models, 2 trunk tensors; values are dyadic so every float operation is exact."""
    base = {"block_0": {"a": F32([1, 1, 1, 1]), "b": F32([0, -1])}, "ln_f": {"scale": F32([1, 2])},
            "task_x": {"head": F32([5])}}
    taus_a = [[1, -2, 3, 0.5],    # entry 0: sum -1, only model 2 agrees; entry 1: sum 0 (tie -> -1)
              [2, 2, -1, 0.25],   # entry 2: sum 1, only model 0 agrees; entry 3: models 0 and 1 agree
              [-4, 0, -1, 0]]
    taus_b = [[0, -1], [0, -0.5], [0, 2]]  # entry 0: zero everywhere; entry 1: sum 0.5, only model 2
    models = [{"block_0": {"a": base["block_0"]["a"] + F32(ta), "b": base["block_0"]["b"] + F32(tb)},
               "ln_f": {"scale": base["ln_f"]["scale"]}, "task_x": {"head": F32([10 + i])}}
              for i, (ta, tb) in enumerate(zip(taus_a, taus_b))]
    return base, models


def elect(base, models, **kw):
    return E.emr_elect(base, M.stack(models), frozen=("ln_f",), **kw)


def test_hand_computation_entry_by_entry():
    base, models = hand_case()
    emr = elect(base, models)
    np.testing.assert_array_equal(emr.tau_uni["block_0"]["a"], [-4, -2, 3, 0.5])
    np.testing.assert_array_equal(emr.tau_uni["block_0"]["b"], [0, 2])
    np.testing.assert_array_equal(emr.masks["block_0"]["a"], [[0, 1, 1, 1], [0, 0, 0, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(emr.masks["block_0"]["b"], [[0, 0], [0, 0], [0, 1]])
    # lambda_i = sum over tensors of mean|tau_i| / sum over tensors of mean|M_i tau_uni| (the original's
    # per-tensor means; a global sum over entries would give 15/11 for model 0)
    # model 0: (6.5/4 + 1/2) / (5.5/4 + 0); model 1: (5.25/4 + 0.5/2) / (0.5/4); model 2: (5/4 + 2/2) / (4/4 + 2/2)
    np.testing.assert_allclose(emr.rescalers, [17 / 11, 12.5, 1.125], rtol=1e-6)
    stacked = E.emr_stack(base, emr)
    l0 = np.float32(17 / 11)
    np.testing.assert_allclose(stacked["block_0"]["a"], [[1, 1 - 2 * l0, 1 + 3 * l0, 1 + 0.5 * l0],
                                                         [1, 1, 1, 1 + 0.5 * 12.5],
                                                         [1 - 4 * 1.125, 1, 1, 1]], rtol=1e-6)
    np.testing.assert_array_equal(stacked["block_0"]["b"], [[0, -1], [0, -1], [0, -1 + 2 * 1.125]])
    np.testing.assert_array_equal(stacked["ln_f"]["scale"], [[1, 2]] * 3)        # frozen: from the base
    np.testing.assert_array_equal(stacked["task_x"]["head"], [[10], [11], [12]])  # each model's own
    for i in range(3):
        one = E.emr_task_params(base, emr, i)
        assert jax.tree.structure(one) == jax.tree.structure(base)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(jax.tree.map(lambda x: x[i], stacked))):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(E.EMRError, match="task index"):
        E.emr_task_params(base, emr, 3)


def perturbed(params, seed, scale=0.05):
    """A stand-in finetune: every param moved except ln_f and the timestep embedding (P2 freezes them)."""
    frozen = subsets.select(params, "ln_f,timestep")
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda x, f: x if f else F32(x + scale * r.normal(size=x.shape)), params, frozen)


def with_leaf(params, path, value):
    """A copy of `params` with the leaf at `path` ('a/b/c') replaced."""
    out = jax.tree.map(lambda x: x, params)
    *keys, last = path.split("/")
    node = out
    for k in keys:
        node = node[k]
    node[last] = value
    return out


@pytest.fixture(scope="module")
def multi():
    cfg = DTConfig.multi_task(TASKS, **SMALL)
    r = np.random.default_rng(0)  # N(0, 0.02) params of the model's shapes, without compiling its init
    pre = jax.tree.map(lambda s: F32(0.02 * r.normal(size=s.shape)), param_shapes(cfg))
    fts = [perturbed(pre, i + 1) for i in range(3)]
    return cfg, pre, fts, M.stack(fts)


def test_permuting_models_permutes_task_models_and_keeps_tau_uni(multi):
    _, pre, fts, stacked = multi
    emr = E.emr_elect(pre, stacked)
    perm = [2, 0, 1]
    emr_p = E.emr_elect(pre, M.stack([fts[j] for j in perm]))
    for a, b in zip(jax.tree.leaves(emr.tau_uni), jax.tree.leaves(emr_p.tau_uni)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(emr_p.rescalers, np.asarray(emr.rescalers)[perm])
    s, sp = E.emr_stack(pre, emr), E.emr_stack(pre, emr_p)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s)[0], jax.tree.leaves(sp)):
        np.testing.assert_array_equal(np.asarray(a)[perm], b, err_msg=subsets.path_str(path))
    # jitted whole: the same result
    jitted = jax.jit(lambda b, m: E.emr_stack(b, E.emr_elect(b, m)))(pre, stacked)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(s)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # the task vectors differ, so the task models do
    assert not np.array_equal(s["block_0"]["mlp"]["c_fc"]["kernel"][0], s["block_0"]["mlp"]["c_fc"]["kernel"][1])


def test_one_model_gives_back_the_finetune(multi):
    _, pre, fts, stacked = multi
    emr = E.emr_elect(pre, M.stack(fts[:1]))
    assert float(emr.rescalers[0]) == 1.0
    tv = jax.tree.map(lambda b, x: np.asarray(x) - np.asarray(b), E._subtree(pre, emr.tau_uni),
                      E._subtree(fts[0], emr.tau_uni))
    for t, m in zip(jax.tree.leaves(tv), jax.tree.leaves(emr.masks)):
        np.testing.assert_array_equal(m[0], t != 0)
    one = E.emr_task_params(pre, emr, 0)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(fts[0])):  # base + (ft - base): within one ulp
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    base, models = hand_case()  # dyadic values: exactly the finetune
    got = E.emr_task_params(base, elect(base, models[:1]), 0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(models[0])):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2 ** 31 - 1), st.booleans())
def test_task_vector_signs_follow_each_model(n, seed, sparse):
    r = np.random.default_rng(seed)
    base = {"block_0": {"w": F32(r.normal(size=(3, 4))), "b": F32(r.normal(size=5))}, "ln_f": {"s": F32([1.0])}}
    taus = [{"w": F32(r.normal(size=(3, 4))), "b": F32(r.normal(size=5))} for _ in range(n)]
    if sparse:  # many exact zeros, and entries that cancel to an exact tie
        taus = [jax.tree.map(lambda t: np.where(np.abs(t) < 0.7, 0, np.round(t)).astype(np.float32), tau)
                for tau in taus]
    if all(not np.any(t) for tau in taus for t in jax.tree.leaves(tau)):
        taus[0]["b"][0] = 1.0
    models = [{"block_0": jax.tree.map(np.add, base["block_0"], tau), "ln_f": base["ln_f"]} for tau in taus]
    emr = elect(base, models)
    assert np.all(np.asarray(emr.rescalers) >= 0)
    stacked = E.emr_stack(base, emr)
    for i, tau in enumerate(taus):
        for k in ("w", "b"):
            got = np.asarray(stacked["block_0"][k][i]) - base["block_0"][k]
            nz = got != 0
            assert np.all(np.sign(got[nz]) == np.sign(tau[k][nz])), (i, k)
            assert not np.any(got[tau[k] == 0])
        if n == 1:
            np.testing.assert_array_equal(emr.masks["block_0"]["w"][0], taus[0]["w"] != 0)


def test_bad_inputs_raise_naming_the_path(multi, tmp_path):
    cfg, pre, fts, stacked = multi
    wide = with_leaf(pre, "block_0/attn/c_attn/kernel", np.zeros((16, 60), np.float32))
    with pytest.raises(M.MergeError, match=r"block_0/attn/c_attn/kernel: base has \(16, 60\), finetunes has \(16, 48\)"):
        E.emr_elect(wide, stacked)
    other = with_leaf(pre, "ln_f/scale", pre["ln_f"]["scale"] + 0.5)  # finetunes froze ln_f: not from this base
    with pytest.raises(M.MergeError, match=r"finetune 0 differs from the base at ln_f/scale"):
        E.emr_elect(other, stacked)
    with pytest.raises(M.MergeError, match="identically zero"):
        E.emr_elect(pre, M.stack([pre, pre]))
    nan = with_leaf(fts[1], "block_0/ln_1/scale", np.full(16, np.nan, np.float32))
    with pytest.raises(M.MergeError, match="non-finite values in model 1 at block_0/ln_1/scale"):
        E.emr_elect(pre, M.stack([fts[0], nan]))
    with pytest.raises(ValueError, match="matches no parameter"):
        E.emr_elect(pre, stacked, subset="atn")
    emr = E.emr_elect(pre, stacked)
    with pytest.raises(E.EMRError, match="does not fit the base"):
        E.emr_stack(wide, emr)
    # artifacts: a round trip, then refusals that leave the folder as it was
    out = tmp_path / "emr"
    base_dir = checkpoint.save(tmp_path / "base", pre, cfg, {})
    E.save_emr(out, emr, base=base_dir, config=cfg, names=["a", "b", "c"], subset="blocks")
    got, meta = E.load_emr(out)
    assert meta["base"] == base_dir and meta["names"] == ["a", "b", "c"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(emr)):
        np.testing.assert_array_equal(a, b)
    lcfg, stacked, _ = E.load_task_models(out)
    assert lcfg == cfg
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(E.emr_stack(pre, emr))):
        np.testing.assert_array_equal(a, b)
    before = sorted(os.listdir(out))
    with pytest.raises(FileExistsError):
        E.save_emr(out, emr, base=base_dir, config=cfg, names=["a", "b", "c"], subset="blocks")
    bad = emr.replace(rescalers=jnp.asarray([1.0, jnp.inf, 1.0]))
    with pytest.raises(E.EMRError, match="rescalers"):
        E.save_emr(tmp_path / "bad", bad, base=base_dir, config=cfg, names=["a", "b", "c"], subset="blocks")
    assert not (tmp_path / "bad").exists() and sorted(os.listdir(out)) == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries left behind
    with pytest.raises(E.EMRError, match="not an mdt_jax EMR artifact"):
        E.load_emr(tmp_path / "base")


def test_evaluate_task_models_runs_task_t_with_model_t(multi):
    from mdt_jax import evaluate as ev

    cfg, pre, fts, stacked = multi
    stats = {t: ev.TaskStats(np.zeros(sd, np.float32), np.ones(sd, np.float32), 1000.0) for t, sd, _ in TASKS}
    rows = E.evaluate_task_models(cfg, jax.tree.map(lambda x: x[:2], stacked), stats, episodes=2, max_steps=8, executor="native",
                                  extra={"model": "x"})
    assert [r["task"] for r in rows] == ["hopper", "walker2d"] and all(r["model"] == "x" for r in rows)
    for t, (name, _, _) in enumerate(TASKS):
        (alone,) = ev.evaluate(cfg, fts[t], [name], stats, episodes=2, max_steps=8, executor="native")
        assert rows[t]["return_mean"] == alone.summary()["return_mean"]
    (wrong,) = ev.evaluate(cfg, fts[0], ["walker2d"], stats, episodes=2, max_steps=8, executor="native")
    assert rows[1]["return_mean"] != wrong.summary()["return_mean"]
    with pytest.raises(ValueError, match="need 2 task models"):
        E.evaluate_task_models(cfg, stacked, stats, episodes=1, max_steps=2)


def _save_multi(tmp_path, cfg, params, task=None, name="m"):
    stats = {t: {"state_mean": [0.0] * sd, "state_std": [1.0] * sd} for t, sd, _ in TASKS}
    meta = {"tasks": [t for t, _, _ in TASKS], "stats": stats} | ({"task": task} if task else {})
    return str(checkpoint.save(tmp_path / name, params, cfg, meta))


def test_merge_p2_emr(tmp_path, multi):
    cfg, pre, fts, stacked = multi
    base = _save_multi(tmp_path, cfg, pre)
    paths = [_save_multi(tmp_path, cfg, ft, t, f"ft_{t}") for ft, (t, _, _) in zip(fts, TASKS)]
    # launch.merge's entry, in-process (the merge CLI itself: tests/test_pipelines.py, test_resume.py)
    from cliargs import config_from_args
    from mdt_jax.run import merge_from_config

    args = ["--config=configs/merge.py", "--config.pipeline=p2", "--config.method=emr", f"--config.base={base}",
            f"--config.checkpoints={','.join(reversed(paths))}", "--config.eval.episodes=2",
            "--config.eval.max_steps=8", "--config.eval_inputs=False"]
    merge_from_config(config_from_args(args), str(tmp_path / "out"))
    out = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert out["merge"]["method"] == "emr" and out["merge"]["base"] == base and len(out["merge"]["rescalers"]) == 2
    rows = [row for row in out["rows"] if row["model"] == "p2_emr"]
    assert [(row["task"], row["task_model"]) for row in rows] == [("hopper", "hopper"), ("walker2d", "walker2d")]
    _, stacked, meta = E.load_task_models(tmp_path / "out" / "emr")
    assert meta["names"] == ["hopper", "walker2d"] and meta["metadata"]["merge"]["subset"] == "blocks"
    np.testing.assert_array_equal(stacked["task_walker2d"]["predict_action"]["kernel"][1],
                                  fts[1]["task_walker2d"]["predict_action"]["kernel"])
    # a base the finetunes cannot come from, or none, is refused, no merge written
    from configs.merge import get_config

    config = get_config()
    config.update(dict(pipeline="p2", method="emr", checkpoints=",".join(paths), eval_inputs=False))
    config.base = _save_multi(tmp_path, cfg, with_leaf(pre, "embed_timestep/embedding", pre["embed_timestep"]["embedding"] * 2),
                              name="other")
    with pytest.raises(M.MergeError, match="cannot have been finetuned from this base"):
        merge_from_config(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "merge.json").exists() and not (tmp_path / "bad" / "emr").exists()
    config.base = ""
    with pytest.raises(ValueError, match="config.base: method=emr needs"):
        merge_from_config(config, str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()
    config.update(dict(base=base, pipeline="p3"))
    with pytest.raises(ValueError, match="emr with pipeline p2"):
        merge_from_config(config, str(tmp_path / "p3"))
