"""RegMean: the merge against closed forms (plain average, least squares, per-feature weights),
invariances, alpha sweeps under vmap, singular Grams; the Grams against a hand-written forward,
vmap over models, multi-task averaging; artifacts; and a launch.gram -> launch.merge round trip."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import checkpoint, merge as M, pipelines as P, regmean as R, run, subsets, trees
from mdt_jax.data import gather_segments, pad_to, sample_batch, save_d4rl_hdf5, segment_data, stack_segment_data
from mdt_jax.models import DTConfig, init_params
from synth import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = DTConfig(hidden_size=8, n_layer=2, n_head=2, context_len=4, max_ep_len=64)  # hopper dims (11, 3)
DATA = segment_data(make_dataset(n_traj=4, min_len=6, max_len=20), context_len=4, max_ep_len=64)
NB, BS = 2, 4  # one shape for every Gram run of CFG: one compilation


def jitter(params, seed, scale=0.3):
    """Every param moved by N(0, scale^2), so LayerNorms and biases are not at their init."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


PARAMS = [jitter(init_params(CFG, jax.random.key(i)), 10 + i) for i in range(3)]
STACKED = M.stack(PARAMS)


def flat(tree) -> dict:
    return {subsets.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_grams(seed, n_models=3, rows=40):
    """Stacked Gram trees X^T X / rows for the trunk Linears of CFG, from random X."""
    r = np.random.default_rng(seed)
    dims = {p: flat(PARAMS[0])[f"{p}/kernel"].shape[0] for p in R.trunk_linear_paths(CFG)}
    out = {}
    for p, d in dims.items():
        xs = r.normal(size=(n_models, rows, d)) * r.uniform(0.2, 3.0, size=(n_models, 1, d))
        out[p] = jnp.asarray(np.einsum("mri,mrj->mij", xs, xs) / rows, jnp.float32)
    return trees.unflatten(out)


# ------------------------------------------------------------------------------------ the merge

def test_equal_grams_give_the_plain_average():
    one = jax.tree.map(lambda g: g[0], random_grams(0))
    same = jax.tree.map(lambda g: jnp.stack([g, g, g]), one)
    got = flat(R.regmean(STACKED, same, 0.9))
    avg = flat(M.weighted_average(STACKED, subset="blocks"))
    for p in got:
        np.testing.assert_allclose(got[p], avg[p], rtol=2e-4, atol=2e-5, err_msg=p)
    kept = flat(PARAMS[0])  # outside the subset: model `keep`'s own values
    for p in ("embed_state/kernel", "ln_f/scale", "predict_action/bias"):
        np.testing.assert_array_equal(got[p], kept[p])


def _toy(n_rows, d=6, o=4, seed=0):
    r = np.random.default_rng(seed)
    Xs = [r.normal(size=(n, d)) * r.uniform(0.3, 2.0, size=d) for n in n_rows]
    Ws = [r.normal(size=(d, o)) for _ in n_rows]
    bs = [r.normal(size=o) for _ in n_rows]
    models = {"block_0": {"mlp": {"c_fc": {"kernel": jnp.asarray(np.stack(Ws), jnp.float32),
                                           "bias": jnp.asarray(np.stack(bs), jnp.float32)}}}}
    return Xs, Ws, bs, models


def test_linear_regression_toy_is_the_least_squares_merge():
    """alpha = 1: argmin_W sum_i ||X_i W - X_i W_i||^2 by numpy lstsq on the stacked rows; with
    per-model mean Grams X_i^T X_i / n_i it is the same fit with model i's rows weighted 1/n_i."""
    Xs, Ws, bs, models = _toy([9, 23, 14])
    lstsq = lambda X, Y: np.linalg.lstsq(X, Y, rcond=None)[0]
    X, Y = np.vstack(Xs), np.vstack([x @ w for x, w in zip(Xs, Ws)])
    summed = {"block_0": {"mlp": {"c_fc": jnp.asarray(np.stack([x.T @ x for x in Xs]), jnp.float32)}}}
    got = R.regmean(models, summed, 1.0)["block_0"]["mlp"]["c_fc"]
    np.testing.assert_allclose(got["kernel"], lstsq(X, Y), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["bias"], np.mean(bs, 0), rtol=1e-6)  # biases: the plain mean, as the original
    w = np.concatenate([np.full(len(x), 1 / np.sqrt(len(x))) for x in Xs])[:, None]
    mean = {"block_0": {"mlp": {"c_fc": jnp.asarray(np.stack([x.T @ x / len(x) for x in Xs]), jnp.float32)}}}
    got = R.regmean(models, mean, 1.0)["block_0"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_allclose(got, lstsq(w * X, w * Y), rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, lstsq(X, Y), rtol=1e-3)  # the two normalisations differ here


def test_alpha_zero_is_the_per_input_feature_weighted_average():
    Xs, Ws, _, models = _toy([7, 11, 30], seed=1)
    G = np.stack([x.T @ x / len(x) for x in Xs])
    got = R.regmean(models, {"block_0": {"mlp": {"c_fc": jnp.asarray(G, jnp.float32)}}}, 0.0)
    want = np.zeros_like(Ws[0])
    for r in range(want.shape[0]):
        want[r] = sum(G[i, r, r] * Ws[i][r] for i in range(3)) / sum(G[i, r, r] for i in range(3))
    np.testing.assert_allclose(got["block_0"]["mlp"]["c_fc"]["kernel"], want, rtol=1e-5, atol=1e-6)


def test_model_order_and_a_common_gram_scale_do_not_matter():
    grams = random_grams(1)
    base = flat(R.regmean(STACKED, grams, 0.7))
    perm = np.array([2, 0, 1])
    shuffled = flat(R.regmean(jax.tree.map(lambda x: x[perm], STACKED),
                              jax.tree.map(lambda g: 37.5 * g[perm], grams), 0.7, keep=1))  # model 0 is now 1
    for p in base:
        np.testing.assert_allclose(shuffled[p], base[p], rtol=2e-4, atol=2e-5, err_msg=p)


def test_alpha_sweep_under_vmap_and_jit_equal_single_calls():
    grams = random_grams(2)
    alphas = jnp.asarray([0.0, 0.5, 0.9, 1.0])
    swept = jax.vmap(lambda a: R.regmean(STACKED, grams, a))(alphas)
    jitted = jax.jit(R.regmean)(STACKED, grams, 0.5)
    for i, a in enumerate(alphas):
        single = flat(R.regmean(STACKED, grams, float(a)))
        for p, x in flat(swept).items():
            np.testing.assert_allclose(x[i], single[p], rtol=2e-5, atol=1e-6, err_msg=f"{p} alpha={float(a)}")
    for p, x in flat(jitted).items():
        np.testing.assert_allclose(x, flat(swept)[p][1], rtol=2e-5, atol=1e-6)
    k = "block_1/mlp/c_proj/kernel"
    assert not np.allclose(flat(swept)[k][0], flat(swept)[k][3], rtol=1e-3)  # alpha matters
    via_dispatch = flat(M.merge("regmean", STACKED, grams=grams, subset="blocks", alpha=0.9))
    for p, x in flat(swept).items():
        np.testing.assert_allclose(via_dispatch[p], x[2], rtol=2e-5, atol=1e-6)


def test_singular_or_bad_grams_and_bad_alpha_raise_naming_the_layer():
    grams = random_grams(3)
    dead = jax.tree_util.tree_map_with_path(   # input feature 5 of block_1/mlp/c_proj is zero in every model
        lambda p, g: g.at[:, 5, :].set(0).at[:, :, 5].set(0) if subsets.path_str(p) == "block_1/mlp/c_proj" else g,
        grams)
    with pytest.raises(M.MergeError, match=r"block_1/mlp/c_proj is singular: 1 input feature\(s\) \(first \[5\]\)"):
        R.regmean(STACKED, dead, 0.9)
    # 3 models x 4 rows < 32 inputs: the exact fit is rank-deficient, the regulariser fixes it
    few = random_grams(3, rows=4)
    with pytest.raises(M.MergeError, match="block_0/mlp/c_proj is numerically singular"):
        R.regmean(STACKED, few, 1.0)
    assert all(np.isfinite(x).all() for x in flat(R.regmean(STACKED, few, 0.9)).values())
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(M.MergeError, match="alpha"):
            R.regmean(STACKED, grams, alpha)
    bad = trees.unflatten({p: g[:2] if p == "block_0/attn/c_proj" else g for p, g in R.flat_grams(grams).items()})
    with pytest.raises(M.MergeError, match=r"block_0/attn/c_proj has shape \(2, 8, 8\)"):
        R.regmean(STACKED, bad, 0.9)
    nan = trees.unflatten({p: g.at[0, 0, 0].set(jnp.nan) if p == "block_0/mlp/c_fc" else g
                   for p, g in R.flat_grams(grams).items()})
    with pytest.raises(M.MergeError, match="non-finite values at block_0/mlp/c_fc"):
        R.regmean(STACKED, nan, 0.9)
    partial = {"block_0": grams["block_0"]}
    with pytest.raises(M.MergeError, match="no Gram for the trunk Linear block_1/attn/c_attn"):
        R.regmean(STACKED, partial, 0.9)
    with pytest.raises(M.MergeError, match="needs Grams"):
        M.merge("regmean", STACKED)


# ------------------------------------------------------------------------------------ the Grams

def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def hand_forward_inputs(cfg, params, batch) -> tuple[dict, np.ndarray]:
    """Every trunk Linear's input (B, 3K, in), by an explicit float64 NumPy forward of the DT
    (timestep embedding after embed_ln, pre-LN GPT-2 blocks, causal + padding mask, relu)."""
    P = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    b = {k: np.asarray(v) for k, v in batch.items()}
    lin = lambda x, p: x @ p["kernel"] + p["bias"]
    B, K = b["mask"].shape
    H, nh = cfg.hidden_size, cfg.n_head
    tokens = np.stack([lin(b["rtg"], P["embed_return"]), lin(b["states"], P["embed_state"]),
                       lin(b["actions"], P["embed_action"])], axis=2).reshape(B, 3 * K, H)
    x = _ln(tokens, P["embed_ln"]) + np.repeat(P["embed_timestep"]["embedding"][b["timesteps"]], 3, axis=1)
    tok = np.repeat(b["mask"], 3, axis=1) > 0
    allowed = np.tril(np.ones((3 * K, 3 * K), bool))[None] & tok[:, None, :]
    inputs = {}
    for i in range(cfg.n_layer):
        blk = P[f"block_{i}"]
        h = _ln(x, blk["ln_1"])
        q, k, v = np.split(lin(h, blk["attn"]["c_attn"]), 3, axis=-1)
        heads = lambda y: y.reshape(B, 3 * K, nh, H // nh)
        logits = np.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / np.sqrt(H // nh)
        logits = np.where(allowed[:, None], logits, -1e30)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        att = np.einsum("bhqk,bkhd->bqhd", probs, heads(v)).reshape(B, 3 * K, H)
        x = x + lin(att, blk["attn"]["c_proj"])
        h2 = _ln(x, blk["ln_2"])
        f = np.maximum(lin(h2, blk["mlp"]["c_fc"]), 0.0)
        x = x + lin(f, blk["mlp"]["c_proj"])
        inputs |= {f"block_{i}/attn/c_attn": h, f"block_{i}/attn/c_proj": att, f"block_{i}/mlp/c_fc": h2,
                   f"block_{i}/mlp/c_proj": f}
    return inputs, tok


def test_grams_are_x_transpose_x_of_a_hand_forward_over_unmasked_tokens():
    # explicit segments, two of them cut at their trajectory's end: left padding is present
    lens = np.asarray(DATA.traj_lens)
    traj = jnp.asarray([0, 1, 2, 3, 1])
    start = jnp.asarray([0, lens[1] - 2, 3, lens[3] - 1, 1])
    batch = gather_segments(DATA, traj, start)
    assert 0 < float(batch["mask"].mean()) < 1
    got = R.grams_from_batches(CFG, PARAMS[0], jax.tree.map(lambda x: x[None], batch))
    inputs, tok = hand_forward_inputs(CFG, PARAMS[0], batch)
    assert int(got.n_tokens) == tok.sum() == 3 * int(batch["mask"].sum())
    gmap = R.flat_grams(got)
    assert sorted(gmap) == sorted(R.trunk_linear_paths(CFG))
    for p, x in inputs.items():
        X = x[tok]  # (counted tokens, in)
        np.testing.assert_allclose(gmap[p], X.T @ X / len(X), rtol=2e-4, atol=2e-5, err_msg=p)
    # compute_grams draws batch b with fold_in(split(rng)[0], b), as documented
    rng = jax.random.key(5)
    drawn = jax.vmap(lambda b: sample_batch(DATA, jax.random.fold_in(jax.random.split(rng)[0], b), BS))(jnp.arange(NB))
    once = R.compute_grams(CFG, PARAMS[0], DATA, num_batches=NB, batch_size=BS, rng=rng)
    again = R.grams_from_batches(CFG, PARAMS[0], drawn)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(again)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_grams_vmap_over_models_equals_a_loop_and_are_deterministic():
    run = lambda p: R.compute_grams(CFG, p, DATA, num_batches=NB, batch_size=BS, rng=jax.random.key(1))
    stacked = jax.vmap(run)(STACKED)
    for i, p in enumerate(PARAMS):
        one = run(p)
        assert int(stacked.n_tokens[i]) == int(one.n_tokens)
        for path, g in R.flat_grams(one).items():
            np.testing.assert_allclose(R.flat_grams(stacked)[path][i], g, rtol=1e-5, atol=1e-7, err_msg=path)
    again = run(PARAMS[0])
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(run(PARAMS[0]))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(R.GramError, match="num_batches"):
        R.compute_grams(CFG, PARAMS[0], DATA, num_batches=0, batch_size=4, rng=jax.random.key(1))
    with pytest.raises(R.GramError, match="single-task"):
        R.compute_grams(CFG, PARAMS[0], DATA, num_batches=1, batch_size=4, rng=jax.random.key(1), task=0)


def test_multi_task_grams_average_the_per_task_grams():
    tasks = [("hopper", 11, 3), ("walker2d", 17, 6)]
    mcfg = DTConfig.multi_task(tasks, hidden_size=8, n_layer=1, context_len=4, max_ep_len=64)
    params = jitter(init_params(mcfg, jax.random.key(0)), 1)
    datas = [segment_data(make_dataset(n_traj=3, state_dim=s, act_dim=a, seed=i), context_len=4, max_ep_len=64)
             for i, (_, s, a) in enumerate(tasks)]
    rng, kw = jax.random.key(3), dict(num_batches=2, batch_size=4)
    every = R.compute_grams(mcfg, params, stack_segment_data(datas), rng=rng, **kw)
    per = [R.compute_grams(mcfg, params, d, rng=jax.random.fold_in(rng, t), task=name, **kw)
           for t, ((name, _, _), d) in enumerate(zip(tasks, datas))]
    assert every.n_batches == 4 and int(every.n_tokens) == sum(int(g.n_tokens) for g in per)
    for p, g in R.flat_grams(every).items():
        np.testing.assert_allclose(g, (R.flat_grams(per[0])[p] + R.flat_grams(per[1])[p]) / 2, rtol=1e-5, atol=1e-7)
    assert not np.allclose(R.flat_grams(per[0])["block_0/mlp/c_fc"], R.flat_grams(per[1])["block_0/mlp/c_fc"])
    with pytest.raises(R.GramError, match="stacked over the model's 2 tasks"):
        R.compute_grams(mcfg, params, pad_to(datas[0], 17, 6), rng=rng, **kw)
    # P2: per-task finetunes' trunks by RegMean on each one's own task Grams, heads from each finetune
    fts = [jitter(params, 20 + t, scale=0.05) for t in range(2)]
    merged = flat(P.p2_merge(mcfg, fts, "regmean", grams=[g.gram for g in per], alpha=0.9))
    want = flat(R.regmean(M.stack(fts), M.stack([g.gram for g in per]), 0.9, subset="blocks"))
    for p in want:
        if p.startswith("block_"):
            np.testing.assert_allclose(merged[p], want[p], rtol=1e-6, atol=1e-8, err_msg=p)
    for t, (name, _, _) in enumerate(tasks):
        np.testing.assert_array_equal(merged[f"task_{name}/predict_action/kernel"],
                                      flat(fts[t])[f"task_{name}/predict_action/kernel"])
    np.testing.assert_array_equal(merged["ln_f/scale"], flat(fts[0])["ln_f/scale"])


# ------------------------------------------------------------------------------------ artifacts

def test_save_load_round_trip_never_overwrites_and_refuses_bad_arrays(tmp_path):
    g = R.compute_grams(CFG, PARAMS[0], DATA, num_batches=NB, batch_size=BS, rng=jax.random.key(0))
    out = R.save_grams(tmp_path / "g", g, {"task": "hopper"})
    back, meta = R.load_grams(out)
    assert meta == {"task": "hopper"} and back.n_batches == NB and int(back.n_tokens) == int(g.n_tokens)
    for p, x in R.flat_grams(g).items():
        np.testing.assert_array_equal(R.flat_grams(back)[p], x)
    before = (tmp_path / "g" / "grams.json").read_bytes()
    with pytest.raises(FileExistsError):
        R.save_grams(tmp_path / "g", g)
    assert (tmp_path / "g" / "grams.json").read_bytes() == before
    stacked = jax.vmap(lambda p: R.compute_grams(CFG, p, DATA, num_batches=NB, batch_size=BS,
                                                 rng=jax.random.key(1)))(STACKED)
    with pytest.raises(R.GramError, match="one model's Grams only"):
        R.save_grams(tmp_path / "s", stacked)
    skew = g.replace(gram=trees.unflatten({p: x.at[0, 1].add(1.0) if p == "block_1/mlp/c_fc" else x
                                   for p, x in R.flat_grams(g).items()}))
    with pytest.raises(R.GramError, match="block_1/mlp/c_fc is not symmetric"):
        R.save_grams(tmp_path / "k", skew)
    assert not (tmp_path / "k").exists() and not (tmp_path / "s").exists()
    (tmp_path / "g" / "grams.json").write_text(json.dumps(json.loads(before) | {"n_tokens": 0}))
    with pytest.raises(R.GramError, match="n_tokens"):
        R.load_grams(tmp_path / "g")
    checkpoint.save(tmp_path / "model", PARAMS[0], CFG, {})
    with pytest.raises(R.GramError, match="grams.json is missing"):
        R.load_grams(tmp_path / "model")


# ------------------------------------------------------------------------------------------ CLI

def test_cli_gram_then_merge_regmean_p1(tmp_path):
    """Two hopper DTs (independent inits, a few steps each): launch.gram for one, the same entry
    in-process for the other, then launch.merge's entry (P1, method=regmean)."""
    from configs import gram as gram_config, merge as merge_config, train as train_config
    from mdt_jax.run import gram_from_config, merge_from_config, train_from_config

    save_d4rl_hdf5(make_dataset(n_traj=6, seed=0), str(tmp_path / "hopper.hdf5"))
    models = []
    for seed in (0, 1):
        c = train_config.get_config()
        c.task, c.dataset, c.seed, c.num_steps, c.steps_per_call, c.checkpoint_every = \
            "hopper", str(tmp_path / "hopper.hdf5"), seed, 2, 2, 2
        c.model.hidden_size, c.model.n_layer, c.model.context_len, c.train.batch_size = 16, 1, 4, 8
        models.append(train_from_config(c, str(tmp_path / f"dt_{seed}")))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               JAX_COMPILATION_CACHE_DIR=os.environ.get("MDT_JAX_CACHE", os.path.join(ROOT, ".jax_cache")))
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=ROOT, env=env, capture_output=True, text=True)
    gdirs = [str(tmp_path / f"gram_{i}") for i in (0, 1)]
    r = run("launch.gram", "--config=configs/gram.py", f"--config.checkpoint={models[0]}",
            f"--config.dataset={tmp_path / 'hopper.hdf5'}", "--config.num_batches=3", "--config.batch_size=8",
            f"--workdir={gdirs[0]}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Grams of 4 trunk Linears over 3 batches" in r.stdout
    c = gram_config.get_config()  # the entry launch.gram calls, in-process for the second model
    c.checkpoint, c.dataset, c.num_batches, c.batch_size = models[1], str(tmp_path / "hopper.hdf5"), 3, 8
    gram_from_config(c, gdirs[1])
    # the CLI normalised states with the checkpoint's own stats: recomputing here gives the same Grams
    model = checkpoint.load(models[0])
    cfg, params = model.cfg, model.params
    own = segment_data(make_dataset(n_traj=6, seed=0), context_len=4, max_ep_len=cfg.max_ep_len).replace(
        state_mean=jnp.asarray(model.norm().state_mean), state_std=jnp.asarray(model.norm().state_std))
    want = R.compute_grams(cfg, params, own, num_batches=3, batch_size=8, rng=jax.random.key(0))
    got, gmeta = R.load_grams(gdirs[0])
    assert gmeta["tasks"] == ["hopper"] and int(got.n_tokens) == int(want.n_tokens)
    for p, g in R.flat_grams(want).items():
        np.testing.assert_allclose(R.flat_grams(got)[p], g, rtol=1e-5, atol=1e-7, err_msg=p)

    # launch.merge's entry, in-process (the merge CLI itself: tests/test_pipelines.py, test_resume.py)
    from cliargs import config_from_args
    merge_from_config(config_from_args([
        "--config=configs/merge.py", "--config.pipeline=p1", "--config.method=regmean",
        f"--config.checkpoints={','.join(models)}", f"--config.grams={','.join(gdirs)}", "--config.regmean_alpha=0.5",
        "--config.eval.episodes=1", "--config.eval.max_steps=5", "--config.eval_inputs=False"]), str(tmp_path / "p1"))
    out = json.loads((tmp_path / "p1" / "merge.json").read_text())
    assert out["merge"]["method"] == "regmean" and out["merge"]["coefficients"] == {"alpha": 0.5}
    assert out["merge"]["grams"] == gdirs
    assert {row["model"] for row in out["rows"]} == {"p1_regmean[hopper_0]", "p1_regmean[hopper_1]"}
    loaded = [checkpoint.load(m) for m in models]
    trunks = M.stack([{k: v for k, v in p.items() if k.startswith("block_")} for _, p, _ in loaded])
    want = flat(R.regmean(trunks, M.stack([R.load_grams(d)[0].gram for d in gdirs]), 0.5, subset="attn,mlp"))
    for i, (_, orig, _) in enumerate(loaded):
        mflat, oflat = flat(checkpoint.load(tmp_path / "p1" / f"merged_hopper_{i}").params), flat(orig)
        for p in want:
            if p.startswith(("block_0/attn", "block_0/mlp")):
                np.testing.assert_allclose(mflat[p], want[p], rtol=1e-5, atol=1e-7, err_msg=p)
            else:  # LayerNorms are not in P1's subset: each model keeps its own
                np.testing.assert_array_equal(mflat[p], oflat[p])
        np.testing.assert_array_equal(mflat["embed_state/kernel"], oflat["embed_state/kernel"])
    k = "block_0/mlp/c_fc/kernel"
    avg = flat(M.weighted_average(trunks, subset="attn,mlp"))
    assert not np.allclose(want[k], avg[k], rtol=1e-2, atol=1e-4)  # RegMean is not the plain average here
    c = merge_config.get_config()
    c.method, c.checkpoints, c.grams = "regmean", ",".join(models), gdirs[0]
    with pytest.raises(ValueError, match="config.grams: method=regmean needs one Gram folder"):
        merge_from_config(c, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
