"""The Flax DT: shapes, masking, causality, the state-token-only fast path, multi-task routing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import subsets
from mdt_jax.models import DTConfig, apply, count_params, init_params, param_shapes
from mdt_jax.train import action_loss

SMALL = dict(hidden_size=32, n_layer=2, n_head=2, context_len=6, max_ep_len=50)


def inputs(cfg, B=3, seed=0, pad=0):
    r = np.random.default_rng(seed)
    K = cfg.context_len
    mask = np.ones((B, K), np.float32)
    mask[0, :pad] = 0
    return (jnp.asarray(r.normal(size=(B, K, cfg.state_dim)), jnp.float32),
            jnp.asarray(r.uniform(-1, 1, size=(B, K, cfg.act_dim)), jnp.float32),
            jnp.asarray(r.normal(size=(B, K, 1)), jnp.float32),
            jnp.asarray(r.integers(0, cfg.max_ep_len, size=(B, K)), jnp.int32),
            jnp.asarray(mask))


def test_param_layout_and_count():
    cfg = DTConfig(state_dim=11, act_dim=3)  # the reference's single-task defaults
    p = init_params(cfg, jax.random.key(0))
    assert set(p) == {"embed_timestep", "embed_return", "embed_state", "embed_action", "embed_ln", "ln_f",
                      "predict_action", "predict_state", "predict_return", "block_0", "block_1", "block_2"}
    assert p["block_0"]["attn"]["c_attn"]["kernel"].shape == (128, 384)
    assert p["block_0"]["mlp"]["c_fc"]["kernel"].shape == (128, 512)
    H = 128
    block = 4 * H + (H * 3 * H + 3 * H) + (H * H + H) + (H * 4 * H + 4 * H) + (4 * H * H + H)
    embed = 1000 * H + (1 * H + H) + (11 * H + H) + (3 * H + H) + 2 * H
    heads = (H * 11 + 11) + (H * 3 + 3) + (H + 1)
    assert count_params(p) == 3 * block + embed + heads + 2 * H
    assert jax.tree.map(lambda x: x.shape, param_shapes(cfg)) == jax.tree.map(lambda x: x.shape, p)


def test_init_statistics():
    cfg = DTConfig(state_dim=11, act_dim=3, n_layer=3)
    p = init_params(cfg, jax.random.key(1))
    assert np.std(p["block_0"]["mlp"]["c_fc"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(p["block_0"]["mlp"]["c_proj"]["kernel"]) == pytest.approx(0.02 / np.sqrt(6), rel=0.05)
    assert np.all(p["block_0"]["attn"]["c_attn"]["bias"] == 0)
    ref = init_params(cfg.replace(init_scheme="reference"), jax.random.key(1))
    assert np.std(ref["embed_timestep"]["embedding"]) == pytest.approx(1.0, rel=0.05)
    assert np.abs(ref["embed_state"]["kernel"]).max() <= 1 / np.sqrt(11)


def test_same_seed_same_params_and_different_seed_differs():
    cfg = DTConfig(state_dim=4, act_dim=2, **SMALL)
    a, b, c = (init_params(cfg, jax.random.key(s)) for s in (3, 3, 4))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not np.array_equal(a["block_0"]["attn"]["c_attn"]["kernel"], c["block_0"]["attn"]["c_attn"]["kernel"])


@pytest.mark.parametrize("order", ["after_ln", "before_ln"])
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_new"])
def test_fast_path_equals_full_forward(order, act):
    cfg = DTConfig(state_dim=4, act_dim=2, timestep_embedding=order, activation=act, **SMALL)
    p = init_params(cfg, jax.random.key(0))
    x = inputs(cfg, pad=2)
    fast = apply(cfg, p, *x)
    _, full, _ = apply(cfg, p, *x, outputs="all")
    np.testing.assert_allclose(fast, full, atol=1e-6)
    np.testing.assert_allclose(apply(cfg, p, *x, outputs="last"), full[:, -1], atol=1e-6)


def test_causal_and_padding_invariance():
    cfg = DTConfig(state_dim=4, act_dim=2, **SMALL)
    p = init_params(cfg, jax.random.key(0))
    s, a, r, t, m = inputs(cfg, pad=2)
    base = np.asarray(apply(cfg, p, s, a, r, t, m))
    # the action at step k is predicted from the state token k: it cannot see a_k or anything later
    a2 = a.at[:, 3:].set(0.5)
    s2 = s.at[:, 4:].add(1.0)
    out = np.asarray(apply(cfg, p, s2, a2, r, t, m))
    real = np.asarray(m, bool)[:, :4]  # padded rows attend to nothing real; only real steps count
    np.testing.assert_allclose(out[:, :4][real], base[:, :4][real], atol=1e-6)
    assert not np.allclose(out[:, 4:], base[:, 4:])
    # whatever sits in padded (masked) steps does not change the real steps' predictions
    s3 = s.at[0, :2].set(100.0)
    out3 = np.asarray(apply(cfg, p, s3, a.at[0, :2].set(-10.0), r, t, m))
    np.testing.assert_allclose(out3[0, 2:], base[0, 2:], atol=1e-5)


def test_timestep_order_switch_changes_function():
    cfg = DTConfig(state_dim=4, act_dim=2, **SMALL)
    p = init_params(cfg, jax.random.key(0))
    x = inputs(cfg)
    assert not np.allclose(apply(cfg, p, *x), apply(cfg.replace(timestep_embedding="before_ln"), p, *x))


def test_dropout_only_with_rng_and_deterministic_per_key():
    cfg = DTConfig(state_dim=4, act_dim=2, **SMALL)
    p = init_params(cfg, jax.random.key(0))
    x = inputs(cfg)
    e1, e2 = apply(cfg, p, *x), apply(cfg, p, *x)
    np.testing.assert_array_equal(e1, e2)
    d1 = apply(cfg, p, *x, rng=jax.random.key(5))
    d2 = apply(cfg, p, *x, rng=jax.random.key(5))
    np.testing.assert_array_equal(d1, d2)
    assert not np.allclose(d1, e1)


def test_no_tanh_head():
    cfg = DTConfig(state_dim=4, act_dim=2, action_tanh=False, **SMALL)
    p = init_params(cfg, jax.random.key(0))
    p["predict_action"]["bias"] = jnp.full((2,), 5.0)
    assert np.all(np.asarray(apply(cfg, p, *inputs(cfg))) > 1.0)


TASKS = [("hopper", 11, 3), ("halfcheetah", 17, 6), ("walker2d", 17, 6)]


def _multi():
    cfg = DTConfig.multi_task(TASKS, **SMALL)
    return cfg, init_params(cfg, jax.random.key(0))


def _single_view(cfg, params, name, sd, ad):
    """The single-task model a multi-task model amounts to on one task."""
    single = DTConfig(state_dim=sd, act_dim=ad, **SMALL)
    sp = {k: v for k, v in params.items() if not k.startswith("task_")} | params[f"task_{name}"]
    return single, sp


def test_multitask_mixed_batch_routes_each_sample_to_its_heads():
    cfg, p = _multi()
    assert {f"task_{n}" for n, _, _ in TASKS} <= set(p)
    r = np.random.default_rng(0)
    B, K = 6, cfg.context_len
    task_id = np.array([0, 1, 2, 2, 0, 1])
    s = r.normal(size=(B, K, 17)).astype(np.float32)
    a = r.uniform(-1, 1, size=(B, K, 6)).astype(np.float32)
    for i, t in enumerate(task_id):  # padded dims are zero, as the sampler gives them
        s[i, :, TASKS[t][1]:] = 0
        a[i, :, TASKS[t][2]:] = 0
    rtg = r.normal(size=(B, K, 1)).astype(np.float32)
    ts = np.tile(np.arange(K), (B, 1)).astype(np.int32)
    mask = np.ones((B, K), np.float32)
    out = np.asarray(apply(cfg, p, s, a, rtg, ts, mask, jnp.asarray(task_id)))
    assert out.shape == (B, K, 6)
    for i, t in enumerate(task_id):
        name, sd, ad = TASKS[t]
        single, sp = _single_view(cfg, p, name, sd, ad)
        want = apply(single, sp, s[i:i + 1, :, :sd], a[i:i + 1, :, :ad], rtg[i:i + 1], ts[i:i + 1], mask[i:i + 1])
        np.testing.assert_allclose(out[i, :, :ad], np.asarray(want)[0], atol=1e-5)
        np.testing.assert_array_equal(out[i, :, ad:], 0)
    # vmap across tasks is one call too
    per_task = jax.vmap(lambda tid: apply(cfg, p, s[:1], a[:1], rtg[:1], ts[:1], mask[:1], tid[None]))(
        jnp.arange(3))
    assert per_task.shape == (3, 1, K, 6)


def test_multitask_every_tasks_heads_get_gradients():
    cfg, p = _multi()
    r = np.random.default_rng(1)
    B, K = 6, cfg.context_len
    batch = {"states": jnp.asarray(r.normal(size=(B, K, 17)), jnp.float32),
             "actions": jnp.asarray(r.uniform(-1, 1, size=(B, K, 6)), jnp.float32),
             "rtg": jnp.ones((B, K, 1)), "timesteps": jnp.zeros((B, K), jnp.int32), "mask": jnp.ones((B, K)),
             "task_id": jnp.array([0, 1, 2, 0, 1, 2])}
    g = jax.grad(lambda q: action_loss(cfg, q, batch))(p)
    for name, _, _ in TASKS:
        for head in ("embed_state", "embed_action", "embed_return", "predict_action", "embed_ln"):
            assert float(jnp.abs(g[f"task_{name}"][head]["kernel" if "ln" not in head else "scale"]).sum()) > 0, \
                (name, head)
    # padded action dims of hopper (3 of 6) carry no gradient into the trunk through the loss
    b2 = dict(batch, task_id=jnp.zeros((B,), jnp.int32))
    b3 = dict(b2, actions=b2["actions"].at[:, :, 3:].set(123.0))
    g2 = jax.grad(lambda q: action_loss(cfg, q, b2))(p)
    g3 = jax.grad(lambda q: action_loss(cfg, q, b3))(p)
    np.testing.assert_allclose(g2["block_0"]["mlp"]["c_fc"]["kernel"], g3["block_0"]["mlp"]["c_fc"]["kernel"],
                               atol=1e-6)


@pytest.mark.parametrize("field,value", [("n_head", 3), ("activation", "swish"), ("dropout", 1.5),
                                         ("timestep_embedding", "middle"), ("hidden_size", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DTConfig(state_dim=4, act_dim=2, **(SMALL | {field: value}))


def test_config_json_round_trip_and_unknown_field():
    cfg = DTConfig.multi_task(TASKS, **SMALL)
    assert DTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        DTConfig.from_dict(cfg.to_dict() | {"bogus": 1})


def test_subsets_aliases_and_typos():
    p = init_params(DTConfig(state_dim=4, act_dim=2, **SMALL), jax.random.key(0))
    attn = subsets.select(p, "attn")
    assert attn["block_1"]["attn"]["c_proj"]["kernel"] and not attn["block_1"]["mlp"]["c_fc"]["kernel"]
    assert not attn["ln_f"]["scale"]
    both = subsets.select(p, "attn,mlp")
    assert 0 < subsets.fraction(p, attn) < subsets.fraction(p, both) < 1
    with pytest.raises(ValueError, match="atn"):
        subsets.select(p, "atn")
    mp = init_params(DTConfig.multi_task(TASKS, **SMALL), jax.random.key(0))
    heads = subsets.select(mp, "heads")
    assert heads["task_walker2d"]["predict_action"]["kernel"] and not heads["task_walker2d"]["embed_state"]["kernel"]
