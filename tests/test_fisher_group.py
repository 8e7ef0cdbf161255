"""Grouped Fishers: G same-shaped models in one vmapped call equal each member's own Fisher
(single-task models of different tasks padded to the widest dims; multi-task finetunes on their
own tasks; multi-task models over every task), and `fisher_group_run` writes each member's
artifact as `fisher_run` does, skipping members already done and refusing bad groups up front."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import checkpoint, fisher as F, fisher_stage as FS
from mdt_jax.data import save_d4rl_hdf5, segment_data, stack_segment_data
from mdt_jax.data.sampler import pad_to
from mdt_jax.models import DTConfig, init_params
from synth import make_dataset

SMALL = dict(hidden_size=8, n_layer=1, n_head=1, context_len=4, max_ep_len=64)
DIMS = [("hopper", 11, 3), ("walker2d", 17, 6)]
CFGS = [DTConfig(state_dim=s, act_dim=a, **SMALL) for _, s, a in DIMS]
KW = dict(num_batches=2, batch_size=4)
# the heads and input embeddings too, so padded entries are in the subset
WIDE_SUBSET = ("block_*", "embed_state", "embed_action", "predict_action")


def _data(s, a, seed):
    return segment_data(make_dataset(n_traj=4 + seed, state_dim=s, act_dim=a, seed=seed), context_len=4, max_ep_len=64)


DATAS = [_data(s, a, i) for i, (_, s, a) in enumerate(DIMS)]
PARAMS = [init_params(c, jax.random.key(i)) for i, c in enumerate(CFGS)]
RNGS = [jax.random.key(10), jax.random.key(11)]


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _close(got: F.FisherResult, want: F.FisherResult):
    assert jax.tree.structure(got.fisher) == jax.tree.structure(want.fisher)
    for x, y in zip(jax.tree.leaves(got.fisher), jax.tree.leaves(want.fisher)):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(got.trace, want.trace, rtol=2e-5)
    np.testing.assert_allclose(got.mean, want.mean, rtol=2e-5)
    assert int(got.n_timesteps) == int(want.n_timesteps) and got.n_batches == want.n_batches


@pytest.mark.parametrize("method", ["faithful", "exact"])
def test_padded_single_task_group_equals_each_members_own_fisher(method):
    wide = F.widest_config(CFGS)
    assert (wide.state_dim, wide.act_dim) == (17, 6)
    params = _stack([F.pad_params(wide, p) for p in PARAMS])
    data = stack_segment_data([pad_to(d, wide.state_dim, wide.act_dim) for d in DATAS])
    group = F.compute_fishers(wide, params, data, jnp.stack(RNGS), act_dims=[c.act_dim for c in CFGS],
                              method=method, subset=WIDE_SUBSET, **KW)
    assert group.trace.shape == (2,)
    for i, cfg in enumerate(CFGS):
        wide_i = jax.tree.map(lambda x: x[i], group)
        own = F.unpad_result(cfg, wide_i, WIDE_SUBSET)
        _close(own, F.compute_fisher(cfg, PARAMS[i], DATAS[i], RNGS[i], method=method, subset=WIDE_SUBSET, **KW))
        # the padded entries (state rows, action rows and columns beyond the member's own) are 0
        for name, axis, n in (("embed_state", 0, cfg.state_dim), ("embed_action", 0, cfg.act_dim),
                              ("predict_action", 1, cfg.act_dim)):
            pad = np.take(np.asarray(wide_i.fisher[name]["kernel"]), np.arange(n, np.shape(wide_i.fisher[name]["kernel"])[axis]),
                          axis=axis)
            assert not pad.any(), name
        assert np.asarray(own.fisher["embed_state"]["kernel"]).any()


def test_multitask_groups_equal_each_members_own_fisher():
    mcfg = DTConfig.multi_task(DIMS, **SMALL)
    base = init_params(mcfg, jax.random.key(5))
    fts = [jax.tree.map(lambda x, i=i: x * (1.0 + 0.1 * (i + 1)), base) for i in range(2)]
    # spec_info: finetune i on its own task i
    spec = F.compute_fishers(mcfg, _stack(fts), stack_segment_data(DATAS), jnp.stack(RNGS),
                             tasks=["hopper", 1], **KW)
    for i, (t, _, _) in enumerate(DIMS):
        _close(jax.tree.map(lambda x: x[i], spec), F.compute_fisher(mcfg, fts[i], DATAS[i], RNGS[i], task=t, **KW))
    # every task: each member's data stacked over the model's tasks
    every = stack_segment_data(DATAS)
    both = jax.tree.map(lambda x: jnp.stack([x, x]), every)
    avg = F.compute_fishers(mcfg, _stack(fts), both, jnp.stack(RNGS), **KW)
    for i in range(2):
        _close(jax.tree.map(lambda x: x[i], avg), F.compute_fisher(mcfg, fts[i], every, RNGS[i], **KW))


def test_bad_groups_are_refused_naming_the_field():
    wide = F.widest_config(CFGS)
    params = _stack([F.pad_params(wide, p) for p in PARAMS])
    data = stack_segment_data([pad_to(d, wide.state_dim, wide.act_dim) for d in DATAS])
    rngs = jnp.stack(RNGS)
    with pytest.raises(F.FisherError, match="rngs"):
        F.compute_fishers(wide, params, data, rngs[:1], **KW)
    with pytest.raises(F.FisherError, match="act_dims"):
        F.compute_fishers(wide, params, data, rngs, act_dims=[3, 7], **KW)
    with pytest.raises(F.FisherError, match="tasks"):
        F.compute_fishers(wide, params, data, rngs, tasks=["hopper", "walker2d"], **KW)
    with pytest.raises(F.FisherError, match="stacked_data"):
        F.compute_fishers(wide, params, DATAS[1], rngs, **KW)
    with pytest.raises(F.FisherError, match="stacked_params"):
        F.compute_fishers(wide, {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}, data, rngs, **KW)
    with pytest.raises(F.FisherError, match=r"cfgs\[1\]"):
        F.widest_config([CFGS[0], CFGS[1].replace(hidden_size=16)])
    with pytest.raises(F.FisherError, match="does not fit"):
        F.pad_params(CFGS[0], PARAMS[1])


def _runs(tmp_path):
    runs = []
    for (task, s, a), cfg, params, seed in zip(DIMS, CFGS, PARAMS, (0, 1)):
        ds = make_dataset(n_traj=5, state_dim=s, act_dim=a, seed=seed)
        stats = {"state_mean": ds.observations.mean(0).tolist(), "state_std": (ds.observations.std(0) + 1e-6).tolist()}
        ck = checkpoint.save(tmp_path / f"dt_{task}", jax.device_get(params), cfg, {"task": task, "rtg_scale": 1000.0} | stats)
        save_d4rl_hdf5(ds, str(tmp_path / f"{task}.hdf5"))
        runs.append(FS.FisherRun(checkpoint=str(ck), dataset=(str(tmp_path / f"{task}.hdf5"),), num_batches=3,
                                 batch_size=4, chunk_batches=2, seed=7))
    return runs


def test_group_run_writes_what_fisher_run_writes_and_skips_done_members(tmp_path):
    runs = _runs(tmp_path)
    alone = [tmp_path / f"alone_{t}" for t, _, _ in DIMS]
    grouped = [tmp_path / f"group_{t}" for t, _, _ in DIMS]
    for r, w in zip(runs, alone):
        FS.fisher_run(r, str(w))
    lines = FS.fisher_group_run(runs, grouped)  # both members in one call
    assert all("-> " + str(g) in line for g, line in zip(grouped, lines))
    for a, g in zip(alone, grouped):
        assert sorted(os.listdir(a)) == sorted(os.listdir(g)) == ["fisher", "fisher.json"]
        assert not os.path.exists(str(g) + ".partial")
        (ra, ma), (rg, mg) = FS.load_fisher(a), FS.load_fisher(g)
        assert ma == mg
        _close(rg, ra)
    # members already done are skipped, left as they are; a new one beside them is computed
    before = [os.stat(g / "fisher.json").st_mtime_ns for g in grouped]
    extra = tmp_path / "extra_hopper"
    lines = FS.fisher_group_run(runs + [runs[0]], grouped + [extra])
    assert all("done already" in line for line in lines[:2]) and [os.stat(g / "fisher.json").st_mtime_ns
                                                                    for g in grouped] == before
    _close(FS.load_fisher(extra)[0], FS.load_fisher(grouped[0])[0])


def test_group_run_refuses_before_writing_anything(tmp_path):
    runs = _runs(tmp_path)
    dirs = [tmp_path / "g_a", tmp_path / "g_b"]
    with pytest.raises(ValueError, match="workdirs"):
        FS.fisher_group_run(runs, dirs[:1])
    # a partial folder left by a different run of the second member: nothing is computed or written
    os.makedirs(str(dirs[1]) + ".partial")
    with open(os.path.join(str(dirs[1]) + ".partial", "run_config.json"), "w") as f:
        f.write('{"seed": 99}')
    with pytest.raises(FileExistsError, match="different run"):
        FS.fisher_group_run(runs, dirs)
    assert not dirs[0].exists() and not dirs[1].exists() and not os.path.exists(str(dirs[0]) + ".partial")
    with pytest.raises(ValueError, match="config.method"):
        FS.fisher_group_run([runs[0], FS.FisherRun(**(runs[1].__dict__ | {"method": "bogus"}))],
                            [tmp_path / "h_a", tmp_path / "h_b"])
    assert not (tmp_path / "h_a").exists() and not (tmp_path / "h_a.partial").exists()
