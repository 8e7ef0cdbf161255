"""Property tests (Hypothesis) for the tree checks, the merge methods and the dataset loaders.

Every input gives a result or a ValueError-family error naming the field or path, never a crash
inside JAX or NumPy (TypeError, IndexError, XlaRuntimeError); and the identities the methods
promise hold: averaging N copies of a model returns it, equal Fishers give the plain average,
lam = 0 gives the base.
"""
import os
import pickle
import tempfile

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from mdt_jax import merge as M, trees
from mdt_jax.data import OfflineDataset, load_d4rl_hdf5, load_reference_pickle, save_d4rl_hdf5
from mdt_jax.data.dataset import NDIMS

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # ties compiles per call
FLOATS = (np.float16, np.float32, np.float64)
DTYPES = FLOATS + (np.int32,)
TOP = ("block_0", "block_1", "ln_f", "embed_state")
SUB = ("kernel", "bias", "scale")
SHAPES = ((), (1,), (3,), (2, 3), (3, 2), (0, 2))


@st.composite
def layouts(draw, shapes=SHAPES, min_leaves=1):
    """{path: shape} of a nested-dict params tree: top keys, each a leaf or a dict of leaves."""
    out = {}
    for top in draw(st.lists(st.sampled_from(TOP), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()):
            out[top] = draw(st.sampled_from(shapes))
        else:
            for sub in draw(st.lists(st.sampled_from(SUB), min_size=1, max_size=2, unique=True)):
                out[f"{top}/{sub}"] = draw(st.sampled_from(shapes))
    return out


def build(layout, seed, dtype=np.float32, lead=(), positive=False):
    r = np.random.default_rng(seed)
    def leaf(shape):
        x = r.normal(size=lead + shape)
        x = np.abs(x) if positive else x
        return (x * 3).astype(dtype) if np.issubdtype(dtype, np.integer) else x.astype(dtype)
    return trees.unflatten({p: leaf(s) for p, s in layout.items()})


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.shape(x) == np.shape(y)
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------ trees.py

@FAST
@given(layouts(), st.integers(0, 2**16))
def test_flatten_unflatten_round_trip(layout, seed):
    tree = build(layout, seed)
    flat = trees.flatten(tree)
    assert list(flat) == trees.paths(tree) and sorted(flat) == sorted(layout)
    back = trees.unflatten(flat)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert all(x is y for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)))
    assert trees.shapes(tree) == layout
    assert trees.flatten(tree, sep=".") == {p.replace("/", "."): x for p, x in flat.items()}


@FAST
@given(layouts(), layouts())
def test_shape_problems_name_exactly_the_differing_paths(a, b):
    problems = trees.shape_problems(a, b)
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = sorted(p for p in set(a) & set(b) if a[p] != b[p])
    assert len(problems) == len(missing) + len(extra) + len(differ)
    for p, q in zip(missing + extra + differ, problems):
        assert p in q
    ta, tb = build(a, 0), build(b, 1)
    if problems:
        with pytest.raises(M.MergeError, match="models do not match") as e:
            M.check_compatible([ta, tb], ["first", "second"])
        assert (missing + extra + differ)[0] in str(e.value)
        with pytest.raises(ValueError, match="do not fit"):
            trees.check_shapes(tb, a)
    else:
        M.check_compatible([ta, tb])
        trees.check_shapes(tb, a)


@FAST
@given(layouts(shapes=((1,), (3,), (2, 3))), st.integers(0, 2**16), st.integers(1, 4), st.data())
def test_check_finite_names_the_path_and_model(layout, seed, n, data):
    stacked = build(layout, seed, lead=(n,))
    trees.check_finite(stacked, names=[f"m{i}" for i in range(n)])
    path = data.draw(st.sampled_from(sorted(layout)))
    model = data.draw(st.integers(0, n - 1))
    bad = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    x = trees.get_path(stacked, path)
    idx = (model,) + tuple(data.draw(st.integers(0, d - 1)) for d in x.shape[1:])
    x[idx] = bad
    assert trees.first_nonfinite(stacked, stacked=True) == (path, model)
    with pytest.raises(M.MergeError, match=f"non-finite values in m{model} at {path}$"):
        trees.check_finite(stacked, error=M.MergeError, names=[f"m{i}" for i in range(n)])
    models = [jax.tree.map(lambda v: v[i], stacked) for i in range(n)]
    with pytest.raises(M.MergeError, match=f"non-finite values in model {model} at {path}$"):
        M.stack(models)


@FAST
@given(layouts(shapes=((1,), (3,), (2, 3))), st.data())
def test_mask_where_pick_overlay(layout, data):
    tree = build(layout, 0)
    top = sorted({p.split("/")[0] for p in layout})
    chosen = data.draw(st.lists(st.sampled_from(top), min_size=1, unique=True))
    m = trees.mask(tree, ",".join(chosen))
    assert [p for p, s in zip(trees.paths(tree), jax.tree.leaves(m)) if s] == \
        [p for p in trees.paths(tree) if p.split("/")[0] in chosen]
    assert all(jax.tree.leaves(trees.mask(tree, None)))
    other = build(layout, 1)
    mixed = trees.where(m, other, tree)
    for p, x in trees.flatten(mixed).items():
        assert x is (trees.get_path(other, p) if p.split("/")[0] in chosen else trees.get_path(tree, p))
    part = trees.pick(other, m)
    assert sorted(trees.paths(part)) == sorted(p for p in layout if p.split("/")[0] in chosen)
    assert_trees_close(trees.overlay(tree, part), mixed)
    with pytest.raises(M.MergeError, match="structure of the params"):
        trees.mask(tree, {"nope": True}, error=M.MergeError)


# ---------------------------------------------------------------------------- merge identities

FLOAT_LAYOUT = layouts(shapes=((1,), (3,), (2, 3)))


@FAST
@given(FLOAT_LAYOUT, st.integers(0, 2**16), st.integers(1, 4), st.sampled_from(FLOATS))
def test_averaging_copies_returns_the_model(layout, seed, n, dtype):
    p = build(layout, seed, dtype)
    tol = 1e-2 if dtype == np.float16 else 1e-5
    out = M.weighted_average(M.stack([p] * n))
    assert_trees_close(out, p, rtol=tol, atol=tol)
    assert all(np.asarray(x).dtype == np.asarray(y).dtype for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(p))
               if dtype != np.float64)  # float64 becomes float32 without jax_enable_x64
    w = np.random.default_rng(seed).uniform(0.1, 2.0, size=n)
    assert_trees_close(M.weighted_average(M.stack([p] * n), w), p, rtol=tol, atol=tol)
    assert_trees_close(M.merge("average", M.stack([p] * n)), p, rtol=tol, atol=tol)


@FAST
@given(FLOAT_LAYOUT, st.integers(0, 2**16), st.integers(2, 4), st.booleans(), st.booleans())
def test_equal_fishers_give_the_plain_average(layout, seed, n, normalize, zeros):
    models = M.stack([build(layout, seed + i) for i in range(n)])
    f = build(layout, seed + 100, positive=True)
    if zeros:  # zero entries (and possibly a whole zero Fisher) take the guarded plain average
        f = jax.tree.map(lambda x: np.where(np.random.default_rng(seed).random(x.shape) < 0.5, 0.0, x)
                         .astype(np.float32), f)
    fishers = M.stack([f] * n)
    out = M.fisher_weighted(models, fishers, normalize_trace=normalize)
    assert_trees_close(out, M.weighted_average(models), rtol=1e-5, atol=1e-6)


@FEW
@given(FLOAT_LAYOUT, st.integers(0, 2**16), st.integers(1, 3), st.floats(0.01, 1.0))
def test_zero_lam_returns_the_base(layout, seed, n, k):
    base = build(layout, seed)
    models = M.stack([build(layout, seed + 1 + i) for i in range(n)])
    for out in (M.task_arithmetic(base, models, 0.0), M.ties(base, models, k=k, lam=0.0)):
        assert_trees_close(out, base, rtol=0, atol=0)
    one = M.stack([build(layout, seed + 1)])
    assert_trees_close(M.task_arithmetic(base, one, 1.0), M.first_model(one), rtol=1e-5, atol=1e-5)
    dropped = M.dare(base, one, 0.0, jax.random.key(seed))
    assert_trees_close(dropped, one, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ merges never crash deep down

COEFFS = st.sampled_from([0.0, 0.3, 1.0, 1.5, -0.5, float("nan"), float("inf")])


@st.composite
def merge_inputs(draw):
    layout = draw(layouts())
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES))
    models = [build(layout, i, dtype) for i in range(n)]
    if n > 1 and draw(st.booleans()):  # a mismatched model
        models[-1] = build(draw(layouts()), 7, dtype)
    fishers = [build(layout, 10 + i, draw(st.sampled_from(DTYPES)), positive=draw(st.booleans())) for i in range(n)]
    if draw(st.booleans()):  # a NaN or inf somewhere
        flat = trees.flatten(models[0])
        path = draw(st.sampled_from(sorted(flat)))
        if flat[path].size and np.issubdtype(flat[path].dtype, np.floating):
            flat[path].reshape(-1)[0] = draw(st.sampled_from([np.nan, np.inf]))
    base = build(layout, 99, dtype if draw(st.booleans()) else draw(st.sampled_from(DTYPES)))
    subset = draw(st.sampled_from([None, "ln_f", "blocks", "heads", "block_0,ln_f", "no leaf"]))
    if subset == "no leaf":  # a bool mask selecting nothing
        subset = jax.tree.map(lambda _: False, base)
    return layout, models, fishers, base, subset, draw(COEFFS), draw(COEFFS)


F16 = {"ln_f": (3,)}
TIES_F16 = (F16, [build(F16, 0, np.float16)], [build(F16, 1, np.float16, positive=True)], build(F16, 2, np.float16),
            None, 0.3, 0.3)  # float16 task vectors once crashed ties' bitcast
EMPTY_MASK = (F16, [build(F16, 0)], [build(F16, 1, positive=True)], build(F16, 2), {"ln_f": False}, 0.3, 0.3)


def _names_something(msg: str, pytrees, coeff_names) -> bool:
    paths = {p for t in pytrees for p in trees.paths(t)} | {p.split("/")[0] for t in pytrees for p in trees.paths(t)}
    words = set(coeff_names) | {"model", "Fisher", "subset", "pattern", "stacked", "weights", "base"}
    return any(w in msg for w in paths | words)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(merge_inputs())
@example(TIES_F16)
@example(EMPTY_MASK)  # once an IndexError in ties
def test_merges_give_a_result_or_a_named_value_error(inputs):
    layout, models, fishers, base, subset, a, b = inputs
    calls = {
        "average": (lambda s, f: M.merge("average", s, subset=subset), ()),
        "weights": (lambda s, f: M.weighted_average(s, jnp.full((M.num_models(s),), a)), ("weights",)),
        "fisher": (lambda s, f: M.merge("fisher", s, fishers=f, subset=subset), ()),
        "task_arithmetic": (lambda s, f: M.merge("task_arithmetic", s, base=base, subset=subset, lam=a), ("lam",)),
        "ties": (lambda s, f: M.merge("ties", s, base=base, subset=subset, k=b, lam=a), ("k", "lam")),
        "dare_ta": (lambda s, f: M.merge("dare_ta", s, base=base, subset=subset, rng=jax.random.key(0), p=b, lam=a),
                    ("p", "lam")),
        "lerp": (lambda s, f: M.lerp(base, models[0], a, subset=subset), ("p",)),
    }
    for name, (call, coeff_names) in calls.items():
        try:
            stacked = M.stack(models)
            fs = M.stack(fishers)
            out = call(stacked, fs)
        except ValueError as e:
            assert _names_something(str(e), models + fishers + [base], coeff_names), f"{name}: {e}"
            continue
        assert trees.shapes(out) == layout, name


# ------------------------------------------------------------------------------ dataset loaders

def _field(draw, name, n, width):
    """A column for `name`: usually well formed for n rows, sometimes bad in one way."""
    kind = draw(st.sampled_from(["ok", "ok", "ok", "dtype", "rows", "ndim", "nonfinite", "ragged", "text", "empty"]))
    r = np.random.default_rng(draw(st.integers(0, 2**16)))
    shape = (n, width) if NDIMS[name] == 2 else (n,)
    x = r.normal(size=shape)
    if name in ("terminals", "timeouts"):
        x = r.random(shape) < 0.2
    if kind == "dtype":
        return x.astype(draw(st.sampled_from(DTYPES + (np.bool_, np.int8))))
    if kind == "rows":
        return x[: max(0, n - 1)]
    if kind == "ndim":
        return x.reshape(shape + (1,))
    if kind == "nonfinite" and name not in ("terminals", "timeouts"):
        x = x.astype(np.float64)
        x.reshape(-1)[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, 1e300]))
        return x
    if kind == "ragged":
        return [list(row) + [0.0] * (i % 2) for i, row in enumerate(np.atleast_2d(x))]
    if kind == "text":
        return np.array(["a"] * n)
    if kind == "empty":
        return x[:0]
    return x


@st.composite
def dataset_columns(draw):
    n, s, a = draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    cols = {k: _field(draw, k, n, s if k in ("observations", "next_observations") else a) for k in NDIMS}
    if draw(st.booleans()):
        cols.pop("next_observations")
    return cols


def _check_dataset(ds: OfflineDataset, cols):
    n = len(ds)
    assert ds.observations.dtype == np.float32 and ds.terminals.dtype == bool
    starts, lengths = ds.trajectory_bounds()
    assert lengths.sum() == n and np.all(lengths > 0) and starts[0] == 0
    back = OfflineDataset.from_trajectories(ds.to_trajectories())
    for k in ("observations", "actions", "rewards"):
        np.testing.assert_array_equal(getattr(back, k), getattr(ds, k))


@FAST
@given(dataset_columns())
def test_offline_dataset_result_or_error_naming_the_field(cols):
    try:
        ds = OfflineDataset(**cols)
    except ValueError as e:
        assert any(f"OfflineDataset.{k}" in str(e) for k in cols), str(e)
        return
    _check_dataset(ds, cols)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dataset_columns(), st.booleans())
def test_hdf5_loader_result_or_error_naming_file_and_field(cols, as_group):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.hdf5")
        with h5py.File(path, "w") as f:
            for k, v in cols.items():
                try:
                    f.create_dataset(k, data=np.asarray(v))
                except (ValueError, TypeError):  # h5py cannot store it (ragged object arrays)
                    f.create_dataset(k, data=np.zeros(3))
            if as_group:
                f.create_group("timeouts_extra")
        try:
            ds = load_d4rl_hdf5(path)
        except ValueError as e:
            assert path in str(e) and any(k in str(e) for k in NDIMS), str(e)
            return
        _check_dataset(ds, cols)
        out = os.path.join(tmp, "again.hdf5")
        save_d4rl_hdf5(ds, out)
        again = load_d4rl_hdf5(out)
        for k in NDIMS:
            x, y = getattr(ds, k), getattr(again, k)
            assert (x is None and y is None) or np.array_equal(x, y)


@st.composite
def trajectories(draw):
    n_traj = draw(st.integers(0, 3))
    s, a = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    out = []
    for i in range(n_traj):
        n = draw(st.integers(1, 5))
        traj = {k: _field(draw, k, n, s if k in ("observations", "next_observations") else a)
                for k in ("observations", "actions", "rewards", "terminals", "next_observations")}
        if isinstance(traj["terminals"], np.ndarray) and traj["terminals"].shape == (n,):
            traj["terminals"] = np.arange(n) == n - 1 if draw(st.booleans()) else np.zeros(n, bool)
        if draw(st.booleans()):
            traj.pop("next_observations")
        if draw(st.integers(0, 9)) == 0:
            traj.pop(draw(st.sampled_from(sorted(traj))))
        if draw(st.integers(0, 9)) == 0:  # another state width than the others
            traj["observations"] = np.zeros((n, s + 1))
        out.append(traj)
    return out


@FAST
@given(trajectories())
def test_pickle_loader_result_or_error_naming_file_and_field(trajs):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.pkl")
        with open(path, "wb") as f:
            pickle.dump(trajs, f)
        try:
            ds = load_reference_pickle(path)
        except ValueError as e:
            msg = str(e)
            assert path in msg, msg
            assert "trajectory" in msg or "OfflineDataset." in msg or "no trajectories" in msg, msg
            return
        _check_dataset(ds, trajs)
        assert len(ds.trajectory_bounds()[0]) == len(trajs)


@FAST
@given(st.sampled_from(DTYPES + (np.int64, np.uint8, np.bool_)), st.sampled_from(((), (0,), (1,), (5,), (2, 3))),
       st.integers(-3, 300))
def test_token_loader_result_or_error_naming_the_file(dtype, shape, hi):
    from mdt_jax.lm import load_tokens

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.npy")
        np.save(path, (np.arange(int(np.prod(shape))).reshape(shape) % max(1, abs(hi)) * np.sign(hi or 1))
                .astype(dtype))
        try:
            tokens = load_tokens(path, vocab_size=256)
        except ValueError as e:
            assert path in str(e)
            return
        assert tokens.dtype == np.int32 and tokens.ndim == 1 and tokens.size >= 2
        assert 0 <= tokens.min() and tokens.max() < 256
