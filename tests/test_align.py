"""Permutation alignment (Git Re-Basin weight matching) of tiny DTs: exactness, recovery, objective, P1."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import align as A, checkpoint, merge as M, pipelines as P
from mdt_jax.models.dt import DTConfig, apply, init_params, param_shapes

SMALL = dict(n_layer=2, context_len=4, max_ep_len=50, dropout=0.0)
TASKS = [("hopper", 11, 3), ("walker2d", 17, 6)]


def single(H=16, n_head=2, state_dim=11, act_dim=3, **kw):
    return DTConfig(state_dim=state_dim, act_dim=act_dim, hidden_size=H, n_head=n_head, **(SMALL | kw))


def leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def inputs(cfg, seed, B=4):
    r = np.random.default_rng(seed)
    K = cfg.context_len
    mask = np.ones((B, K), np.float32)
    mask[0, :2] = 0  # left padding
    return (jnp.asarray(r.normal(size=(B, K, cfg.state_dim)), jnp.float32),
            jnp.asarray(r.uniform(-1, 1, size=(B, K, cfg.act_dim)), jnp.float32),
            jnp.asarray(r.normal(size=(B, K, 1)), jnp.float32),
            jnp.asarray(r.integers(0, cfg.max_ep_len, size=(B, K)), jnp.int32), jnp.asarray(mask),
            jnp.asarray(r.integers(0, len(cfg.tasks), size=(B,)), jnp.int32) if cfg.multi else None)


def sq_dist(a, b) -> float:
    return float(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def merged_part(params):
    return {k: {m: v[m] for m in ("attn", "mlp")} for k, v in P.trunk(params).items()}


@pytest.mark.parametrize("multi,activation,order", [(False, "relu", "after_ln"), (False, "gelu_new", "before_ln"),
                                                    (True, "gelu_new", "after_ln"), (True, "relu", "before_ln")])
def test_random_permutation_computes_the_same_function(multi, activation, order):
    kw = dict(hidden_size=16, n_head=2, activation=activation, timestep_embedding=order, **SMALL)
    cfg = DTConfig.multi_task(TASKS, **kw) if multi else DTConfig(state_dim=11, act_dim=3, **kw)
    params = init_params(cfg, jax.random.key(0))
    perms = A.random_perms(cfg, jax.random.key(1))
    permuted = jax.jit(lambda p, s: A.permute(cfg, p, s))(params, perms)
    assert leaves_equal(permuted, A.permute(cfg, params, perms))  # jitted == eager
    c = params["block_1"]["attn"]["c_attn"]["kernel"]
    assert not np.array_equal(permuted["block_1"]["attn"]["c_attn"]["kernel"], c)
    assert leaves_equal(A.permute(cfg, params, A.identity_perms(cfg)), params)
    for seed in range(3):
        x = inputs(cfg, seed)
        want, got = apply(cfg, params, *x, outputs="all"), apply(cfg, permuted, *x, outputs="all")
        for w, g in zip(want, got):  # state, action and return predictions
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(apply(cfg, permuted, *x), apply(cfg, params, *x), atol=1e-5)


@pytest.mark.parametrize("H,n_head,multi", [(16, 1, False), (16, 4, True)])
def test_matching_a_permuted_copy_recovers_it_exactly(H, n_head, multi):
    kw = dict(hidden_size=H, n_head=n_head, **SMALL)
    cfg = DTConfig.multi_task(TASKS, **kw) if multi else DTConfig(state_dim=11, act_dim=3, **kw)
    ref = init_params(cfg, jax.random.key(0))
    for k in (3, 4, 5):
        pi = A.random_perms(cfg, jax.random.key(k))
        other = A.permute(cfg, ref, pi)
        sigma = A.weight_matching(cfg, ref, other, seed=k)
        assert leaves_equal(A.permute(cfg, other, sigma), ref)
        assert leaves_equal(A.compose(pi, sigma), A.identity_perms(cfg))
    aligned, perms = A.align(cfg, [ref, other])
    assert aligned[0] is ref and leaves_equal(perms[0], A.identity_perms(cfg))
    assert leaves_equal(aligned[1], ref)


def test_compose_matches_sequential_permutes():
    cfg = single(H=16, n_head=4)
    p = init_params(cfg, jax.random.key(0))
    a, b = A.random_perms(cfg, jax.random.key(1)), A.random_perms(cfg, jax.random.key(2))
    assert leaves_equal(A.permute(cfg, A.permute(cfg, p, a), b), A.permute(cfg, p, A.compose(a, b)))


@pytest.mark.parametrize("init", ["stats", "identity"])
def test_objective_never_decreases_and_increases_overall(init):
    cfg = single(H=16, n_head=2)
    ref, other = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1))
    trace = []
    perms = A.weight_matching(cfg, ref, other, seed=4, init=init, progress_fn=lambda i, g, j: trace.append((i, g, j)))
    js = np.array([j for _, _, j in trace])
    start = A.objective(cfg, ref, other, A.identity_perms(cfg))
    final = A.objective(cfg, ref, other, perms)
    assert len({g for _, g, _ in trace}) == 1 + 2 * cfg.n_layer  # residual, mlp[i], attn[i]
    assert np.all(np.diff(js) >= -1e-9 * abs(js[0]))
    np.testing.assert_allclose(js[-1], final, rtol=1e-12)
    assert final > start
    assert final <= A.objective(cfg, ref, ref, A.identity_perms(cfg))  # Cauchy-Schwarz: at most ||ref||^2
    if init == "identity":
        assert js[0] >= start - 1e-9 * abs(start)
    # deterministic: the same seed gives the same permutations
    assert leaves_equal(perms, A.weight_matching(cfg, ref, other, seed=4, init=init))
    both = A.objective(cfg, ref, other, A.weight_matching(cfg, ref, other, seed=4, init="both"))
    assert both >= final - 1e-12 * abs(final)  # the default keeps the better of the two starts


def test_aligned_average_is_closer_to_each_model_than_the_plain_average():
    cfg = single(H=16, n_head=2)
    a, b = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1))
    (_, b_al), _ = A.align(cfg, [a, b], seed=0)
    avg = lambda x, y: jax.tree.map(lambda u, v: (u + v) / 2, merged_part(x), merged_part(y))
    plain, aligned = avg(a, b), avg(a, b_al)
    assert sq_dist(aligned, merged_part(a)) < sq_dist(plain, merged_part(a))
    assert sq_dist(aligned, merged_part(b_al)) < sq_dist(plain, merged_part(b))
    # the permutation is an isometry: b's own norm is unchanged
    assert np.isclose(sq_dist(merged_part(b_al), jax.tree.map(jnp.zeros_like, merged_part(b))),
                      sq_dist(merged_part(b), jax.tree.map(jnp.zeros_like, merged_part(b))), rtol=1e-6)


def shaped(cfg, seed=0):
    """Random params of `cfg`'s shapes, without running the model's init."""
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(r.normal(size=s.shape), s.dtype), param_shapes(cfg))


def test_bad_inputs_are_refused_with_the_path():
    cfg16, cfg32 = single(H=16), single(H=32)
    p16, p32 = shaped(cfg16), shaped(cfg32)
    shapes = r"block_0/attn/c_attn/kernel: model 0 has \(16, 48\), model 1 has \(32, 96\)"
    with pytest.raises(M.MergeError, match=shapes):
        A.align([cfg16, cfg32], [p16, p32])
    deep = single(H=16, n_layer=3)
    with pytest.raises(M.MergeError, match="block_2.*only in model 1"):
        A.align([cfg16, deep], [p16, shaped(deep)])
    four = single(H=16, n_head=4)
    with pytest.raises(M.MergeError, match="n_head=2.*n_head=4"):
        A.align([cfg16, four], [p16, shaped(four)])
    with pytest.raises(M.MergeError, match="block_0/attn/c_attn/kernel"):
        A.weight_matching(cfg16, p16, p32)
    nan = jax.tree.map(lambda x: x, p16)
    nan["block_1"]["mlp"]["c_fc"]["kernel"] = nan["block_1"]["mlp"]["c_fc"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="non-finite.*block_1/mlp/c_fc/kernel"):
        A.weight_matching(cfg16, p16, nan)
    ident = A.identity_perms(cfg16)
    with pytest.raises(ValueError, match=r"perms.mlp\[1\]: not a permutation"):
        A.permute(cfg16, p16, ident._replace(mlp=(ident.mlp[0], jnp.zeros(64, jnp.int32))))
    with pytest.raises(ValueError, match=r"perms.residual: expected shape \(16,\)"):
        A.permute(cfg16, p16, ident._replace(residual=jnp.arange(8)))
    with pytest.raises(ValueError, match="extra/w is not a Decision Transformer param"):
        A.permute(cfg16, p16 | {"extra": {"w": jnp.ones(3)}}, ident)
    with pytest.raises(ValueError, match="matches no parameter"):
        A.weight_matching(cfg16, p16, p16, match_on="atn")
    with pytest.raises(ValueError, match="iters"):
        A.weight_matching(cfg16, p16, p16, iters=0)
    with pytest.raises(ValueError, match="needs cfgs"):
        P.p1_merge([p16, p16], align=True)


def test_p1_align_merges_aligned_trunks_and_keeps_each_tasks_own_rest():
    cfgs = [single(H=16, n_head=2, state_dim=s, act_dim=a) for _, s, a in TASKS]
    models = [init_params(c, jax.random.key(i)) for i, c in enumerate(cfgs)]
    aligned, perms = A.align(cfgs, models)
    mh, mw = P.p1_merge(models, "average", align=True, cfgs=cfgs)
    k = lambda t: t["block_1"]["mlp"]["c_fc"]["kernel"]
    np.testing.assert_allclose(k(mh), (k(aligned[0]) + k(aligned[1])) / 2, rtol=1e-6)
    np.testing.assert_array_equal(k(mh), k(mw))
    assert not np.allclose(k(mh), k(P.p1_merge(models, "average")[0]))  # the alignment changed the merge
    # each task's own rest, with the residual permutation folded in (walker2d is the aligned model)
    r = np.asarray(perms[1].residual)
    np.testing.assert_array_equal(mw["embed_state"]["kernel"], np.asarray(models[1]["embed_state"]["kernel"])[:, r])
    np.testing.assert_array_equal(mw["predict_action"]["kernel"], np.asarray(models[1]["predict_action"]["kernel"])[r])
    np.testing.assert_array_equal(mw["ln_f"]["scale"], np.asarray(models[1]["ln_f"]["scale"])[r])
    np.testing.assert_array_equal(mw["embed_timestep"]["embedding"],
                                  np.asarray(models[1]["embed_timestep"]["embedding"])[:, r])
    assert leaves_equal({k: v for k, v in mh.items() if not k.startswith("block_")},
                        {k: v for k, v in models[0].items() if not k.startswith("block_")})
    # the merged part is the only difference from the aligned model: the unmerged aligned model still acts like
    # the original walker2d model
    x = inputs(cfgs[1], 0)
    np.testing.assert_allclose(apply(cfgs[1], aligned[1], *x), apply(cfgs[1], models[1], *x), atol=1e-5)
    # Fishers follow their models' permutations
    fishers = [jax.tree.map(lambda v: jnp.abs(v) + 1e-3, P.trunk(m)) for m in models]
    fh, _ = P.p1_merge(models, "fisher", fishers, align=True, cfgs=cfgs)
    pf = [fishers[0], A.permute(cfgs[1], fishers[1], perms[1])]
    want = M.fisher_weighted(M.stack([P.trunk(a) for a in aligned]), M.stack(pf), subset=P.P1_SUBSET)
    np.testing.assert_allclose(k(fh), k(want), rtol=1e-6)


def test_merge_from_config_p1_align(tmp_path):
    from configs import merge as merge_config
    from mdt_jax import run
    cfgs = [single(H=16, n_head=2, state_dim=s, act_dim=a, max_ep_len=1000) for _, s, a in TASKS]
    paths = []
    for i, ((task, sd, _), c) in enumerate(zip(TASKS, cfgs)):
        meta = {"task": task, "state_mean": [0.0] * sd, "state_std": [1.0] * sd, "rtg_scale": 1000.0}
        paths.append(str(checkpoint.save(tmp_path / f"dt_{task}", init_params(c, jax.random.key(i)), c, meta)))
    config = merge_config.get_config()
    config.checkpoints, config.align, config.eval_inputs = ",".join(paths), True, False
    config.eval.episodes, config.eval.max_steps, config.eval.own_task = 1, 3, True
    run.merge_from_config(config, str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["merge"]["align"] is True and {r["model"] for r in record["rows"]} == {
        "p1_average[hopper]", "p1_average[walker2d]"}
    _, got, meta = checkpoint.load(tmp_path / "out" / "merged_walker2d")
    assert meta["merge"]["align"] is True
    want = P.p1_merge([checkpoint.load(p).params for p in paths], align=True, cfgs=cfgs)[1]
    assert leaves_equal(jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want))
    config.pipeline, config.checkpoints = "p2", ",".join(paths)
    with pytest.raises(ValueError, match="config.align"):
        run.merge_from_config(config, str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()
