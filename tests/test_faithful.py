"""The reference's merge formulas, transcribed independently in NumPy (float64), against the
library's defaults on random DT-shaped trees: P1 Fisher (trace over all trunk blocks, with and
without trace normalisation), P2 Fisher, and TIES as the original TIES code computes it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import merge as M, pipelines as P
from mdt_jax.models import DTConfig, init_params

SMALL = dict(hidden_size=16, n_layer=2, n_head=2, context_len=4, max_ep_len=20)
TASKS = [("hopper", 11, 3), ("halfcheetah", 17, 6), ("walker2d", 17, 6)]


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x, np.float64)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_fisher(params, rng, *, ln_scale=1.0, zero=False):
    """A positive Fisher over the blocks (zeros elsewhere, as fisher.py returns), LNs scaled."""
    out = {}
    for k, v in params.items():
        if k.startswith("block_"):
            out[k] = {}
            for name, sub in v.items():
                s = ln_scale if name.startswith("ln") else 1.0
                out[k][name] = jax.tree.map(lambda x: jnp.asarray(
                    0.0 * x if zero else s * rng.gamma(0.5, 1e-3, x.shape), jnp.float32), sub)
        else:
            out[k] = jax.tree.map(jnp.zeros_like, v)
    return out


def reference_fisher_merge(models, fishers, merged_paths, normalize=True):
    """The reference: f_i = F_i / sum(F_i over every block param); theta = sum f_i theta_i / sum f_j."""
    fm, ff = [flat(m) for m in models], [flat(f) for f in fishers]
    traces = [sum(v.sum() for k, v in f.items() if k.startswith("block_")) for f in ff]
    out = {}
    for k in merged_paths:
        fi = [f[k] / t if normalize else f[k] for f, t in zip(ff, traces)]
        out[k] = sum(w * m[k] for w, m in zip(fi, fm)) / sum(fi)
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_p1_fisher_default_is_the_reference(normalize):
    rng = np.random.default_rng(0)
    cfgs = [DTConfig(state_dim=s, act_dim=a, **SMALL) for _, s, a in TASKS]
    models = [init_params(c, jax.random.key(10 + i)) for i, c in enumerate(cfgs)]
    # one model's LayerNorm Fisher much larger: the trace scopes then differ a lot
    fishers = [random_fisher(m, rng, ln_scale=50.0 if i == 1 else 1.0) for i, m in enumerate(models)]
    merged = P.p1_merge(models, "fisher", fishers, normalize_trace=normalize)
    paths = [k for k in flat(models[0]) if k.startswith("block_") and ("/attn/" in k or "/mlp/" in k)]
    want = reference_fisher_merge([P.trunk(m) for m in models], [P.trunk(f) for f in fishers], paths, normalize)
    for out in merged:
        got = flat(out)
        for k in paths:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-7, err_msg=k)
    if normalize:  # the subset scope is a different merge here (kept as an option)
        sub = P.p1_merge(models, "fisher", fishers, trace_over="subset")
        diff = max(np.abs(flat(sub[0])[k] - want[k]).max() / (np.ptp([flat(m)[k] for m in models], 0).max() + 1e-12)
                   for k in paths)
        assert diff > 0.01


def test_p2_fisher_default_is_the_reference():
    rng = np.random.default_rng(1)
    cfg = DTConfig.multi_task(TASKS, **SMALL)
    pre = init_params(cfg, jax.random.key(0))
    fts = [jax.tree.map(lambda x, i=i: x + 0.01 * jnp.asarray(rng.normal(size=x.shape), jnp.float32), pre)
           for i in range(3)]
    fishers = [random_fisher(f, rng) for f in fts]
    merged = P.p2_merge(cfg, fts, "fisher", fishers)
    paths = [k for k in flat(pre) if k.startswith("block_")]
    want = reference_fisher_merge(fts, fishers, paths)
    got = flat(merged)
    for k in paths:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-6, atol=1e-7, err_msg=k)


def test_fisher_zero_denominators_guarded_only_there():
    cfg = DTConfig(state_dim=5, act_dim=2, **SMALL)
    models = [init_params(cfg, jax.random.key(i)) for i in range(3)]
    rng = np.random.default_rng(2)
    fishers = [random_fisher(m, rng) for m in models]
    # entries where every model's Fisher is 0: the plain average there, the reference elsewhere
    hole = jax.tree.map(lambda f: f.at[..., :1].set(0.0) if f.ndim else f, fishers)
    out = M.fisher_weighted(M.stack(models), M.stack(hole), subset="blocks")
    ref = M.fisher_weighted(M.stack(models), M.stack(hole), subset="blocks", floor=0.0)
    avg = M.weighted_average(M.stack(models), subset="blocks")
    k = "block_0/mlp/c_fc/kernel"
    o, r, a = flat(out)[k], flat(ref)[k], flat(avg)[k]
    assert np.isnan(r[..., 0]).all() and np.isfinite(r[..., 1:]).all()
    np.testing.assert_allclose(o[..., 0], a[..., 0], rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(o[..., 1:], r[..., 1:])
    # one model's Fisher all zero: the reference is NaN everywhere (0/0 in its normalisation);
    # the default gives that model weight 0
    zero = fishers[:2] + [random_fisher(models[2], rng, zero=True)]
    ref = M.fisher_weighted(M.stack(models), M.stack(zero), subset="blocks", floor=0.0)
    assert np.isnan(flat(ref)[k]).all()
    out = M.fisher_weighted(M.stack(models), M.stack(zero), subset="blocks")
    two = M.fisher_weighted(M.stack(models[:2]), M.stack(zero[:2]), subset="blocks")
    np.testing.assert_allclose(flat(out)[k], flat(two)[k], rtol=1e-5, atol=1e-8)
    # all zero: the plain average
    allz = [random_fisher(m, rng, zero=True) for m in models]
    out = M.fisher_weighted(M.stack(models), M.stack(allz), subset="blocks")
    np.testing.assert_allclose(flat(out)[k], a, rtol=1e-5, atol=1e-8)


def test_fisher_trace_scopes_by_hand():
    A = {"block_0": {"attn": {"w": jnp.array([1.0, -2.0, 3.0])}, "ln_1": {"scale": jnp.array([1.0])}}}
    B = {"block_0": {"attn": {"w": jnp.array([3.0, 2.0, -1.0])}, "ln_1": {"scale": jnp.array([5.0])}}}
    FA = {"block_0": {"attn": {"w": jnp.array([1.0, 0.0, 3.0])}, "ln_1": {"scale": jnp.array([4.0])}}}
    FB = {"block_0": {"attn": {"w": jnp.array([1.0, 2.0, 1.0])}, "ln_1": {"scale": jnp.array([0.0])}}}
    # trace over the whole Fisher (the reference): 8 and 4 -> f_A = FA/8, f_B = FB/4
    out = M.fisher_weighted(M.stack([A, B]), M.stack([FA, FB]), subset="attn")
    fa, fb = np.array([1, 0, 3]) / 8, np.array([1, 2, 1]) / 4
    want = (fa * np.array([1, -2, 3]) + fb * np.array([3, 2, -1])) / (fa + fb)
    np.testing.assert_allclose(out["block_0"]["attn"]["w"], want, rtol=1e-6)
    np.testing.assert_allclose(out["block_0"]["ln_1"]["scale"], [1.0])  # not merged: model 0's
    # trace over the merged subset: 4 and 4
    out = M.fisher_weighted(M.stack([A, B]), M.stack([FA, FB]), subset="attn", trace_over="subset")
    fa, fb = np.array([1, 0, 3]) / 4, np.array([1, 2, 1]) / 4
    np.testing.assert_allclose(out["block_0"]["attn"]["w"],
                               (fa * np.array([1, -2, 3]) + fb * np.array([3, 2, -1])) / (fa + fb), rtol=1e-6)
    with pytest.raises(M.MergeError, match="trace_over"):
        M.fisher_weighted(M.stack([A, B]), M.stack([FA, FB]), trace_over="blocks")


def ties_oracle(base, models, k, lam, paths):
    """The original TIES code (ties_merging: topk_values_mask, resolve_sign with majority
    fallback, disjoint_merge 'mean') on the flattened task vectors of `paths`."""
    fb, fm = flat(base), [flat(m) for m in models]
    sizes = [fb[p].size for p in paths]
    # task vectors in float32, as the original's torch tensors (their rounding decides ties at the threshold)
    T = np.stack([np.concatenate([(m[p].astype(np.float32) - fb[p].astype(np.float32)).astype(np.float64).ravel()
                                  for p in paths]) for m in fm])  # (n, d)
    n, d = T.shape
    kk = d - int(d * k)
    kth = np.sort(np.abs(T), axis=1)[:, kk - 1:kk]  # torch.kthvalue(kk): kk-th smallest, 1-indexed
    T = T * (np.abs(T) >= kth)
    sign = np.sign(T.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    keep = np.where(sign[None] > 0, T > 0, T < 0)
    sel = T * keep
    merged = sel.sum(0) / np.maximum((sel != 0).sum(0), 1)
    out, i = {}, 0
    for p, s in zip(paths, sizes):
        out[p] = fb[p] + lam * merged[i:i + s].reshape(fb[p].shape)
        i += s
    return out


@pytest.mark.parametrize("k", [0.2, 0.37, 0.5, 0.7])
def test_ties_matches_the_original_code(k):
    cfg = DTConfig(state_dim=5, act_dim=2, **SMALL)
    base = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(3)
    # small-integer task vectors (exact in float32): many summed signs are exactly 0, and
    # magnitudes tie at the threshold
    models = [jax.tree.map(lambda x: x + jnp.asarray(rng.integers(-2, 3, x.shape), jnp.float32) / 64, base)
              for _ in range(3)]
    out = M.ties(base, M.stack(models), k=k, lam=0.8, subset="attn,mlp")
    paths = [p for p in flat(base) if "/attn/" in p or "/mlp/" in p]
    want = ties_oracle(base, models, k, 0.8, paths)
    got = flat(out)
    n_zero_sign = 0
    for p in paths:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-6, atol=1e-6, err_msg=p)
    T = np.stack([np.concatenate([(flat(m)[p].astype(np.float32) - flat(base)[p].astype(np.float32)).ravel()
                                  for p in paths]) for m in models])
    d = T.shape[1]
    assert d * k != int(d * k) or k == 0.5  # the non-integer count case is covered
    n_zero_sign = int((T.sum(0) == 0).sum())
    assert n_zero_sign > 0  # the zero-sign case is hit
    for p in flat(base):  # outside the subset: the base
        if p not in paths:
            np.testing.assert_array_equal(got[p], flat(base)[p])


def test_ties_majority_sign_fallback_by_hand():
    base = {"block_0": {"attn": {"w": jnp.zeros(4)}}}
    # sums per entry: [2, 1, 0, 3] -> signs [+, +, 0, +]; majority +: entry 2 keeps positives
    m1 = {"block_0": {"attn": {"w": jnp.array([1.0, 2.0, 5.0, 1.0])}}}
    m2 = {"block_0": {"attn": {"w": jnp.array([1.0, -1.0, -5.0, 2.0])}}}
    out = M.ties(base, M.stack([m1, m2]), k=1.0)
    np.testing.assert_allclose(out["block_0"]["attn"]["w"], [1.0, 2.0, 5.0, 1.5])
    # keep count: int(4 * 0.3) + 1 = 2 per model (the original), not ceil(1.2) = 2... and 0.5 -> 3
    assert M.ties_keep_count(4, 0.3) == 2 and M.ties_keep_count(4, 0.5) == 3 and M.ties_keep_count(4, 1.0) == 4
    assert M.ties_keep_count(10, 0.7) == 8  # float64, as the original: int(7.000000000000001) + 1


def test_no_decay_pattern_exempts_the_trunk_and_eps_is_used():
    """The reference's `--custom_transformer_decay`: no weight decay on the GPT-2 trunk."""
    from mdt_jax.train import TrainConfig, optimizer

    cfg = DTConfig(state_dim=5, act_dim=2, **SMALL)
    params = init_params(cfg, jax.random.key(0))
    tcfg = TrainConfig(learning_rate=0.1, weight_decay=0.5, warmup_steps=1, no_decay=P.P2_FINETUNE["no_decay"],
                       adam_eps=P.P2_FINETUNE["adam_eps"])
    opt = optimizer(tcfg)
    zero = jax.tree.map(jnp.zeros_like, params)  # zero gradients: Adam's update is 0, decay alone moves params
    updates, _ = opt.update(zero, opt.init(params), params)
    for path, u in flat(updates).items():
        p = flat(params)[path]
        if path.startswith(("block_", "ln_f")):
            np.testing.assert_array_equal(u, 0.0, err_msg=path)
        else:
            np.testing.assert_allclose(u, -0.1 * 0.5 * p, rtol=1e-6, err_msg=path)
    # eps enters Adam's denominator: a gradient of 1e-6 gives 1e-6 / (1e-6 + eps) after bias correction
    g = jax.tree.map(lambda x: jnp.full_like(x, 1e-6), params)
    opt6 = optimizer(TrainConfig(learning_rate=0.1, weight_decay=0.0, warmup_steps=1, adam_eps=1e-6))
    u6, _ = opt6.update(g, opt6.init(params), params)
    np.testing.assert_allclose(flat(u6)["ln_f/bias"], -0.1 * 0.5, rtol=1e-4)


def test_best_checkpoint_on_selection_episodes_next_to_last(tmp_path, capsys):
    """The reference's --save_mode both, selecting on held-out (selection) episodes; launch.train's
    entry in-process (the CLI itself: tests/test_train.py)."""
    import json

    from cliargs import config_from_args
    from test_train import _cli, save_d4rl_hdf5
    from synth import make_dataset
    from mdt_jax import checkpoint
    from mdt_jax.run import train_from_config

    path = str(tmp_path / "d.hdf5")
    save_d4rl_hdf5(make_dataset(), path)
    w = tmp_path / "w"
    capsys.readouterr()
    train_from_config(config_from_args(_cli(w, path, "--config.save_mode=both", "--config.eval_every=40",
                                            "--config.select_episodes=2", "--config.select_seed=77")), str(w))
    stdout = capsys.readouterr().out
    best = json.loads((w / "best.json").read_text())
    assert best["step"] in (40, 80, 120) and best["selection"]["reset_seed"] == 77
    scores = [float(line.split("selection score ")[1].split()[0]) for line in stdout.splitlines()
              if line.startswith("eval step")]
    assert len(scores) == 3 and abs(max(scores) - best["score"]) < 0.01
    _, last, ml = checkpoint.load(w / "model")
    _, bp, mb = checkpoint.load(w / "model_best")
    assert ml["checkpoint_mode"] == "last" and mb["checkpoint_mode"] == "best" and mb["steps"] == best["step"]
    if best["step"] == 120:
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(bp)))
    # eval_every without selection episodes: a clear error, nothing written
    with pytest.raises(ValueError, match="select_episodes"):
        train_from_config(config_from_args(_cli(tmp_path / "bad", path, "--config.eval_every=40")),
                          str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_init_trunk_from_takes_blocks_and_ln_f_and_refuses_other_shapes(tmp_path):
    from mdt_jax import checkpoint
    from mdt_jax.run import trunk_from_checkpoint

    src_cfg = DTConfig.multi_task(TASKS, **SMALL)
    src = init_params(src_cfg, jax.random.key(5))
    path = checkpoint.save(str(tmp_path / "mt"), src, src_cfg, {"kind": "multi_task"})
    cfg = DTConfig(state_dim=11, act_dim=3, **SMALL)
    own = init_params(cfg, jax.random.key(6))
    out = trunk_from_checkpoint(cfg, own, path)
    for k in out:
        want = src[k] if (k.startswith("block_") or k == "ln_f") else own[k]
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(out[k]), jax.tree.leaves(want))), k
    with pytest.raises(ValueError, match="init_trunk_from.*hidden_size: 16 in .*, 32 here"):
        trunk_from_checkpoint(cfg.replace(hidden_size=32), init_params(cfg.replace(hidden_size=32), jax.random.key(0)),
                              path)
    with pytest.raises(ValueError, match="n_head"):
        trunk_from_checkpoint(cfg.replace(n_head=4), own, path)
