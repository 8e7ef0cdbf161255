"""Merge methods: hand-computed cases, invariances, subsets, vmapped coefficients, refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import merge as M
from mdt_jax.models import DTConfig, init_params

SMALL = dict(hidden_size=16, n_layer=2, context_len=4, max_ep_len=20)


def tiny(**leaves):
    """A 2-leaf 'model' for hand computation: block_0/attn/w and ln_f/scale."""
    return {"block_0": {"attn": {"w": jnp.asarray(leaves["w"], jnp.float32)}},
            "ln_f": {"scale": jnp.asarray(leaves["s"], jnp.float32)}}


A = tiny(w=[1.0, -2.0, 3.0], s=[1.0])
B = tiny(w=[3.0, 2.0, -1.0], s=[5.0])
C = tiny(w=[2.0, 0.0, 1.0], s=[9.0])


def leaf(t, path="block_0/attn/w"):
    for k in path.split("/"):
        t = t[k]
    return np.asarray(t)


def test_weighted_average_by_hand_and_subset():
    out = M.weighted_average(M.stack([A, B]))
    np.testing.assert_allclose(leaf(out), [2.0, 0.0, 1.0])
    np.testing.assert_allclose(leaf(out, "ln_f/scale"), [3.0])
    out = M.weighted_average(M.stack([A, B]), jnp.array([3.0, 1.0]), subset="attn")
    np.testing.assert_allclose(leaf(out), [1.5, -1.0, 2.0])
    np.testing.assert_allclose(leaf(out, "ln_f/scale"), [1.0])  # outside the subset: model 0's
    out = M.weighted_average(M.stack([A, B]), subset="attn", keep=1)
    np.testing.assert_allclose(leaf(out, "ln_f/scale"), [5.0])


def test_lerp_by_hand_and_vmapped_sweep():
    np.testing.assert_allclose(leaf(M.lerp(A, B, 0.25)), [1.5, -1.0, 2.0])
    ps = jnp.linspace(0, 1, 5)
    sweep = jax.vmap(lambda p: M.lerp(A, B, p))(ps)
    assert leaf(sweep).shape == (5, 3)
    np.testing.assert_allclose(leaf(sweep)[0], leaf(A))
    np.testing.assert_allclose(leaf(sweep)[-1], leaf(B))
    jitted = jax.jit(lambda p: M.lerp(A, B, p))(0.5)
    np.testing.assert_allclose(leaf(jitted), [2.0, 0.0, 1.0])


def test_fisher_weighted_by_hand():
    FA = tiny(w=[1.0, 0.0, 3.0], s=[100.0])
    FB = tiny(w=[1.0, 2.0, 1.0], s=[0.0])
    # subset attn, trace over the subset: traces 4 and 4 -> f = F/4; w_A = (FA/4)/(FA/4+FB/4)
    out = M.fisher_weighted(M.stack([A, B]), M.stack([FA, FB]), subset="attn", floor=0.0, trace_over="subset")
    want = (np.array([1, 0, 3]) * np.array([1, -2, 3]) + np.array([1, 2, 1]) * np.array([3, 2, -1])) / np.array([2, 2, 4])
    np.testing.assert_allclose(leaf(out), want, rtol=1e-6)
    np.testing.assert_allclose(leaf(out, "ln_f/scale"), [1.0])
    # without trace normalisation and different traces, the raw Fishers weigh in
    FB2 = tiny(w=[3.0, 2.0, 1.0], s=[0.0])
    out = M.fisher_weighted(M.stack([A, B]), M.stack([FA, FB2]), subset="attn", floor=0.0, normalize_trace=False)
    np.testing.assert_allclose(leaf(out), [(1 * 1 + 3 * 3) / 4, 2.0, (9 - 1) / 4], rtol=1e-6)


def test_fisher_all_zero_is_the_average_not_nan_and_floor0_reproduces_reference_nan():
    Z = tiny(w=[0.0, 0.0, 0.0], s=[0.0])
    out = M.fisher_weighted(M.stack([A, B]), M.stack([Z, Z]))
    np.testing.assert_allclose(leaf(out), [2.0, 0.0, 1.0])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))
    ref = M.fisher_weighted(M.stack([A, B]), M.stack([Z, Z]), floor=0.0)
    assert np.isnan(leaf(ref)).all()


def test_task_arithmetic_ties_dare_by_hand():
    base = tiny(w=[0.0, 0.0, 0.0], s=[1.0])
    T1 = tiny(w=[4.0, -1.0, 0.5], s=[2.0])
    T2 = tiny(w=[-2.0, -3.0, 0.1], s=[3.0])
    models = M.stack([T1, T2])
    np.testing.assert_allclose(leaf(M.task_arithmetic(base, models, 0.5)), [1.0, -2.0, 0.3], rtol=1e-6)
    # TIES, subset attn (3 entries/model), k=0.5 keeps int(3 * 0.5) + 1 = 2 magnitudes of each task
    # vector (the original code's count): T1 -> [4, -1, 0], T2 -> [-2, -3, 0]; signs of sums
    # [+, -, 0]; the 0 takes the majority sign sign(1 - 1 + 0) = 0, where the original keeps the
    # negative entries (none here): disjoint means [4, -2, 0]
    out = M.ties(base, models, k=0.5, lam=1.0, subset="attn")
    np.testing.assert_allclose(leaf(out), [4.0, -2.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(leaf(out, "ln_f/scale"), [1.0])
    # k=1 keeps everything: elected sign + disjoint mean
    np.testing.assert_allclose(leaf(M.ties(base, models, k=1.0, subset="attn")), [4.0, -2.0, 0.3], rtol=1e-6)
    # DARE with p -> 0 is the identity; with p = 0.5 kept entries are doubled, dropped ones are 0
    d = M.dare(base, models, 0.5, jax.random.key(0), subset="attn")
    tv, dv = leaf(models), leaf(d)
    assert np.all((dv == 0) | np.isclose(dv, 2 * tv))
    big = M.dare(tiny(w=np.zeros(20000), s=[1.0]), M.stack([tiny(w=np.ones(20000), s=[1.0])]), 0.3,
                 jax.random.key(1), subset="attn")
    kept = leaf(big)[0]
    assert abs((kept != 0).mean() - 0.7) < 0.02 and np.allclose(kept[kept != 0], 1 / 0.7)


def test_invariances_on_a_real_dt():
    cfg = DTConfig(state_dim=5, act_dim=2, **SMALL)
    p = [init_params(cfg, jax.random.key(i)) for i in range(3)]
    same = M.weighted_average(M.stack([p[0]] * 3), subset="blocks")
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(p[0])):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    F = jax.tree.map(lambda x: jnp.full(x.shape, 0.3), p[0])
    fish = M.fisher_weighted(M.stack(p), M.stack([F] * 3), subset="blocks")
    avg = M.weighted_average(M.stack(p), subset="blocks")
    for x, y in zip(jax.tree.leaves(fish), jax.tree.leaves(avg)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    w = jnp.array([0.2, 0.5, 0.3])
    a = M.weighted_average(M.stack(p), w, subset="attn,mlp")
    b = M.weighted_average(M.stack([p[2], p[0], p[1]]), w[jnp.array([2, 0, 1])], subset="attn,mlp", keep=1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert 0.5 < M.merged_fraction(p[0], "attn,mlp") < 0.9


def test_mismatched_trees_listed():
    cfg = DTConfig(state_dim=5, act_dim=2, **SMALL)
    p0 = init_params(cfg, jax.random.key(0))
    p1 = init_params(cfg.replace(hidden_size=32), jax.random.key(0))
    with pytest.raises(M.MergeError, match="block_0/attn/c_attn/kernel") as e:
        M.stack([p0, p1], ["hopper", "walker"])
    assert "walker" in str(e.value)
    p2 = {k: v for k, v in p0.items() if k != "ln_f"}
    with pytest.raises(M.MergeError, match="ln_f"):
        M.stack([p0, p2])


@pytest.mark.parametrize("call,needle", [
    (lambda: M.lerp(A, B, 1.5), "p"),
    (lambda: M.weighted_average(M.stack([A, B]), jnp.array([-1.0, 2.0])), "weights"),
    (lambda: M.ties(A, M.stack([B]), k=0.0), "k"),
    (lambda: M.dare(A, M.stack([B]), 1.0, jax.random.key(0)), "p"),
    (lambda: M.task_arithmetic(A, M.stack([B]), float("nan")), "lam"),
    (lambda: M.merge("slerp", M.stack([A, B])), "slerp"),
    (lambda: M.merge("ties", M.stack([A, B])), "base"),
    (lambda: M.stack([A, tiny(w=[np.nan, 0, 0], s=[1.0])]), "block_0/attn/w"),
    (lambda: M.fisher_weighted(M.stack([A, B]), M.stack([A, B])), "negative"),
])
def test_bad_coefficients_and_methods(call, needle):
    with pytest.raises(M.MergeError, match=needle):
        call()


def test_dispatch_matches_functions():
    base = tiny(w=[0.0, 0.0, 0.0], s=[1.0])
    models = M.stack([A, B])
    np.testing.assert_allclose(leaf(M.merge("ties", models, base=base, k=0.5, lam=0.7)),
                               leaf(M.ties(base, models, k=0.5, lam=0.7)))
    a = M.merge("dare_ties", models, base=base, rng=jax.random.key(3), p=0.3, k=0.5)
    b = M.ties(base, M.dare(base, models, 0.3, jax.random.key(3)), k=0.5)
    np.testing.assert_allclose(leaf(a), leaf(b))
