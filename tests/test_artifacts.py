"""Self-describing model artifacts: a checkpoint carries its per-task normalisers; version-1
folders (statistics inside the metadata) still load through the one converter."""
import json

import jax
import numpy as np
import pytest

from mdt_jax import checkpoint
from mdt_jax.data import Normalizer, load_task_data, save_d4rl_hdf5
from mdt_jax.models.dt import DTConfig, TaskSpec, init_params

from synth import make_dataset

SINGLE = DTConfig(state_dim=11, act_dim=3, hidden_size=16, n_layer=1, n_head=1, context_len=4, max_ep_len=100)
MULTI = DTConfig.multi_task((TaskSpec("hopper", 11, 3), TaskSpec("walker2d", 17, 6)), hidden_size=16, n_layer=1,
                            n_head=1, context_len=4, max_ep_len=100)


def _norm(n, k=0.0, scale=1000.0):
    return Normalizer(np.arange(n, dtype=np.float32) + k, np.full(n, 2.0, np.float32), scale)


def _as_v1(path, metadata):
    """Rewrite a folder's header in the version-1 layout (the params/ folder is the same)."""
    head = json.loads((path / checkpoint.META_FILE).read_text())
    head = {"format": head["format"], "format_version": 1, "config": head["config"], "metadata": metadata}
    (path / checkpoint.META_FILE).write_text(json.dumps(head))


def test_norms_round_trip_single_and_multi(tmp_path):
    p = init_params(SINGLE, jax.random.key(0))
    out = checkpoint.save(tmp_path / "s", p, SINGLE, {"task": "hopper", "steps": 3}, norms={"hopper": _norm(11)})
    m = checkpoint.load(out)
    assert m.tasks == ("hopper",) and m.norm() == _norm(11) and m.norm("walker2d") == _norm(11)
    assert m.metadata == {"task": "hopper", "steps": 3}
    cfg, params, meta = m  # the triple of the version-1 API
    assert cfg == SINGLE and meta == m.metadata and jax.tree.structure(params) == jax.tree.structure(p)
    pm = init_params(MULTI, jax.random.key(1))
    norms = {"hopper": _norm(11, 1.0), "walker2d": _norm(17, 2.0, 500.0)}
    mm = checkpoint.load(checkpoint.save(tmp_path / "m", pm, MULTI, {"kind": "multi_task"}, norms=norms))
    assert mm.tasks == ("hopper", "walker2d") and mm.norm("walker2d") == norms["walker2d"]
    with pytest.raises(ValueError, match="name one"):
        mm.norm()


def test_version_1_folders_load_through_the_converter(tmp_path):
    p = init_params(SINGLE, jax.random.key(0))
    path = tmp_path / "v1"
    checkpoint.save(path, p, SINGLE, {"task": "hopper"}, norms={"hopper": _norm(11)})
    _as_v1(path, {"task": "hopper", "state_mean": _norm(11).state_mean.tolist(), "state_std": [2.0] * 11,
                  "rtg_scale": 250.0, "steps": 7})
    m = checkpoint.load(path)
    assert m.tasks == ("hopper",) and m.norm() == _norm(11, scale=250.0)
    assert m.metadata == {"task": "hopper", "steps": 7}  # the statistics moved out of the metadata
    pm = init_params(MULTI, jax.random.key(1))
    pathm = tmp_path / "v1m"
    checkpoint.save(pathm, pm, MULTI, {}, norms={})
    _as_v1(pathm, {"kind": "multi_task_finetune", "task": "walker2d",
                   "stats": {"hopper": _norm(11).to_dict(), "walker2d": _norm(17).to_dict()}, "rtg_scale": 1000.0})
    mm = checkpoint.load(pathm)
    assert mm.norm("hopper") == _norm(11) and mm.norm("walker2d") == _norm(17) and mm.metadata["task"] == "walker2d"
    assert checkpoint.read_meta(pathm)[1] == mm.metadata


@pytest.mark.parametrize("norms, match", [
    ({"hopper": _norm(5)}, "5 state dims"),
    ({"ant": _norm(11)}, "not one of the tasks"),
])
def test_save_refuses_normalisers_that_do_not_fit(tmp_path, norms, match):
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.save(tmp_path / "x", init_params(SINGLE, jax.random.key(0)), SINGLE, {"task": "hopper"},
                        norms=norms, tasks=("hopper",))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bad, match", [
    ({"state_mean": [0.0] * 11, "state_std": [0.0] * 11}, "state_std"),
    ({"state_mean": [float("nan")] * 11, "state_std": [1.0] * 11}, "NaN"),
    ({"state_mean": [0.0] * 11}, "state_std"),
    ({"state_mean": [0.0] * 11, "state_std": [1.0] * 11, "rtg_scale": -1}, "rtg_scale"),
])
def test_corrupt_normalisers_are_refused_on_load(tmp_path, bad, match):
    path = tmp_path / "c"
    checkpoint.save(path, init_params(SINGLE, jax.random.key(0)), SINGLE, {"task": "hopper"},
                    norms={"hopper": _norm(11)})
    head = json.loads((path / checkpoint.META_FILE).read_text())
    head["norms"]["hopper"] = bad
    (path / checkpoint.META_FILE).write_text(json.dumps(head))
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load(path)


def test_load_task_data_uses_the_models_normaliser(tmp_path):
    ds = make_dataset(n_traj=4, seed=0)
    path = str(tmp_path / "hopper.hdf5")
    save_d4rl_hdf5(ds, path)
    own = load_task_data(path, "hopper", SINGLE)
    np.testing.assert_allclose(own.state_mean, ds.observations.mean(0), rtol=1e-5, atol=1e-6)
    n = _norm(11, scale=250.0)
    data = load_task_data(path, "hopper", SINGLE, n)
    assert data.rtg_scale == 250.0 and np.array_equal(np.asarray(data.state_mean), n.state_mean)
    with pytest.raises(ValueError, match="config.dataset.*needs"):
        load_task_data(path, "walker2d", MULTI)
    with pytest.raises(ValueError, match="generated-dataset resolver|not generated"):
        from mdt_jax.data import loading
        saved = dict(loading._RESOLVERS)
        loading._RESOLVERS.clear()
        try:
            load_task_data("generated:hopper-random", "hopper", SINGLE)
        finally:
            loading._RESOLVERS.update(saved)


def test_the_model_broadcasts_a_scalar_task_id():
    from mdt_jax.models.dt import apply

    params = init_params(MULTI, jax.random.key(2))
    B, K = 3, 4
    rng = np.random.default_rng(0)
    s = rng.normal(size=(B, K, 17)).astype(np.float32)
    a = rng.normal(size=(B, K, 6)).astype(np.float32)
    r = rng.normal(size=(B, K, 1)).astype(np.float32)
    t = np.tile(np.arange(K, dtype=np.int32), (B, 1))
    want = apply(MULTI, params, s, a, r, t, None, np.full(B, 1, np.int32))
    np.testing.assert_array_equal(apply(MULTI, params, s, a, r, t, None, 1), want)
    with pytest.raises(ValueError, match="task_id"):
        apply(MULTI, params, s, a, r, t, None, np.ones(B + 1, np.int32))
