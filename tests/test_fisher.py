"""Fisher: both estimators against direct loops, vmap over models, subsets, determinism, multi-task
averaging, artifacts (round trip and refusals) and the CLI."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mdt_jax import checkpoint, fisher as F, fisher_stage as FS, run, subsets
from mdt_jax.data import sample_batch, save_d4rl_hdf5, segment_data, stack_segment_data
from mdt_jax.models import DTConfig, apply, init_params
from mdt_jax.train import action_loss
from synth import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = DTConfig(hidden_size=8, n_layer=2, context_len=4, max_ep_len=64)  # hopper dims (11, 3)
PARAMS = init_params(CFG, jax.random.key(0))
DATA = segment_data(make_dataset(n_traj=4), context_len=4, max_ep_len=64)
NB, BS = 2, 4
BATCHES = jax.vmap(lambda k: sample_batch(DATA, k, BS))(jax.random.split(jax.random.key(1), NB))
RNG = jax.random.key(2)


def paths(tree) -> dict:
    return {subsets.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def batch(b):
    return jax.tree.map(lambda x: x[b], BATCHES)


@jax.jit
def _grad(params, batch, key):
    return jax.grad(lambda p: action_loss(CFG, p, batch, key))(params)


@jax.jit
def _example_grad(params, batch, key, i):
    """Example i's share of the batch gradient: its squared error over the batch's entry count."""
    def loss(p):
        b = batch
        pred = apply(CFG, p, b["states"], b["actions"], b["rtg"], b["timesteps"], b["mask"], rng=key)
        err = jnp.square(pred - batch["actions"]) * batch["mask"][..., None]
        return err[i].sum() / (batch["mask"].sum() * CFG.act_dim)
    return jax.grad(loss)(params)


def direct_faithful(params):
    """The reference's loop: sum over batches of grad(batch-mean loss)^2, / unmasked timesteps."""
    acc, n = jax.tree.map(jnp.zeros_like, params), 0.0
    for b in range(NB):
        g = _grad(params, batch(b), jax.random.fold_in(RNG, b))
        acc = jax.tree.map(lambda a, x: a + x * x, acc, g)
        n += float(batch(b)["mask"].sum())
    return paths(jax.tree.map(lambda a: a / n, acc)), n


@pytest.fixture(scope="module")
def faithful():
    return F.fisher_from_batches(CFG, PARAMS, BATCHES, RNG)


def test_faithful_is_the_reference_formula(faithful):
    want, n = direct_faithful(PARAMS)
    got = paths(faithful.fisher)
    blocks = [p for p in want if p.startswith("block_")]
    for p in want:
        if p in blocks:
            np.testing.assert_allclose(got[p], want[p], rtol=2e-5, atol=1e-12, err_msg=p)
        else:
            assert not got[p].any(), f"{p} is outside the default subset but nonzero"
    trace = sum(want[p].sum() for p in blocks)
    np.testing.assert_allclose(faithful.trace, trace, rtol=1e-5)
    np.testing.assert_allclose(faithful.mean, trace / sum(want[p].size for p in blocks), rtol=1e-5)
    assert int(faithful.n_timesteps) == n and faithful.n_batches == NB and faithful.method == "faithful"


def test_exact_is_a_loop_over_examples_whose_grads_sum_to_the_batch_grad():
    got = paths(F.fisher_from_batches(CFG, PARAMS, BATCHES, RNG, method="exact", subset="all").fisher)
    acc, n = jax.tree.map(jnp.zeros_like, PARAMS), 0.0
    for b in range(NB):
        key = jax.random.fold_in(RNG, b)
        gs = [_example_grad(PARAMS, batch(b), key, i) for i in range(BS)]
        total, whole = paths(jax.tree.map(lambda *g: sum(g), *gs)), paths(_grad(PARAMS, batch(b), key))
        for p in whole:
            np.testing.assert_allclose(total[p], whole[p], rtol=1e-4, atol=1e-9, err_msg=p)
        acc = jax.tree.map(lambda a, *g: a + sum(x * x for x in g), acc, *gs)
        n += float(batch(b)["mask"].sum())
    want = paths(jax.tree.map(lambda a: a / n, acc))
    for p in want:  # every module kind: Linear, the twice-called c_attn, LayerNorm, Embed
        np.testing.assert_allclose(got[p], want[p], rtol=1e-4, atol=1e-12, err_msg=p)


@pytest.mark.parametrize("method,subset", [("faithful", "blocks"), ("exact", "all")])
def test_vmap_over_models_equals_each_alone(method, subset):
    other = init_params(CFG, jax.random.key(7))
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), PARAMS, other)
    both = jax.vmap(lambda p: F.fisher_from_batches(CFG, p, BATCHES, RNG, method=method, subset=subset))(stacked)
    for m, params in enumerate([PARAMS, other]):
        alone = F.fisher_from_batches(CFG, params, BATCHES, RNG, method=method, subset=subset)
        for p, x in paths(alone.fisher).items():
            np.testing.assert_allclose(paths(both.fisher)[p][m], x, rtol=1e-5, atol=1e-12, err_msg=p)
        np.testing.assert_allclose(both.trace[m], alone.trace, rtol=1e-5)


def test_subset_restriction(faithful):
    mask = subsets.select(PARAMS, "attn")
    by_pattern = F.fisher_from_batches(CFG, PARAMS, BATCHES, RNG, subset="attn")
    by_mask = F.fisher_from_batches(CFG, PARAMS, BATCHES, RNG, subset=mask)
    blocks, inside = paths(faithful.fisher), paths(mask)
    for p, x in paths(by_pattern.fisher).items():
        if inside[p]:
            np.testing.assert_allclose(x, blocks[p], rtol=1e-6, err_msg=p)  # a leaf's F ignores the subset
        else:
            assert not x.any(), p
        np.testing.assert_array_equal(x, paths(by_mask.fisher)[p])
    size = sum(x.size for p, x in blocks.items() if inside[p])
    np.testing.assert_allclose(by_pattern.trace, sum(blocks[p].sum() for p in blocks if inside[p]), rtol=1e-5)
    np.testing.assert_allclose(by_pattern.mean, by_pattern.trace / size, rtol=1e-6)
    with pytest.raises(ValueError, match="atn"):
        F.fisher_from_batches(CFG, PARAMS, BATCHES, RNG, subset="atn")
    with pytest.raises(F.FisherError, match="no parameter"):
        F.fisher_from_batches(CFG, PARAMS, BATCHES, RNG, subset=jax.tree.map(lambda _: False, PARAMS))
    with pytest.raises(F.FisherError, match="'nope'"):
        F.fisher_from_batches(CFG, PARAMS, BATCHES, RNG, method="nope")


def test_deterministic_and_sampling_contract(faithful):
    again = F.fisher_from_batches(CFG, PARAMS, BATCHES, RNG)
    jax.tree.map(np.testing.assert_array_equal, again.fisher, faithful.fisher)
    other = F.fisher_from_batches(CFG, PARAMS, BATCHES, jax.random.key(3))  # dropout differs
    k = "block_0/mlp/c_fc/kernel"
    assert not np.allclose(paths(other.fisher)[k], paths(faithful.fisher)[k], rtol=1e-3, atol=0)
    # compute_fisher samples batch b with fold_in(k_data, b) and runs it with fold_in(k_drop, b)
    sampled = F.compute_fisher(CFG, PARAMS, DATA, RNG, num_batches=NB, batch_size=BS)
    k_data, k_drop = jax.random.split(RNG)
    batches = jax.vmap(lambda b: sample_batch(DATA, jax.random.fold_in(k_data, b), BS))(jnp.arange(NB))
    want = F.fisher_from_batches(CFG, PARAMS, batches, k_drop)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), sampled.fisher, want.fisher)
    again = F.compute_fisher(CFG, PARAMS, DATA, RNG, num_batches=NB, batch_size=BS)
    jax.tree.map(np.testing.assert_array_equal, again.fisher, sampled.fisher)


def test_multitask_average_is_the_reference_combination_and_spec_info_is_one_task():
    cfg = DTConfig.multi_task([("a", 11, 3), ("b", 6, 2)], hidden_size=8, n_layer=1, context_len=4, max_ep_len=64)
    params = init_params(cfg, jax.random.key(0))
    da = DATA
    db = segment_data(make_dataset(n_traj=4, state_dim=6, act_dim=2, seed=1), context_len=4, max_ep_len=64)
    kw = dict(num_batches=1, batch_size=BS)
    avg = F.compute_fisher(cfg, params, stack_segment_data([da, db]), RNG, **kw)
    ra = F.compute_fisher(cfg, params, da, jax.random.fold_in(RNG, 0), task="a", **kw)  # spec_info
    rb = F.compute_fisher(cfg, params, db, jax.random.fold_in(RNG, 1), task=1, **kw)
    for p, x in paths(avg.fisher).items():
        np.testing.assert_allclose(x, (paths(ra.fisher)[p] + paths(rb.fisher)[p]) / 2, rtol=1e-5, atol=1e-12, err_msg=p)
    np.testing.assert_allclose(avg.trace, ra.trace + rb.trace, rtol=1e-5)  # the reference sums traces
    np.testing.assert_allclose(avg.mean, (ra.mean + rb.mean) / 2, rtol=1e-5)
    assert int(avg.n_timesteps) == int(ra.n_timesteps) + int(rb.n_timesteps) and avg.n_batches == 2
    assert not paths(ra.fisher)["task_a/embed_state/kernel"].any()  # heads are outside the subset
    with pytest.raises(F.FisherError, match="stacked"):
        F.compute_fisher(cfg, params, da, RNG, **kw)


def test_artifact_round_trip_and_refusals(faithful, tmp_path):
    out = FS.save_fisher(tmp_path / "f", faithful, {"task": "hopper"})
    got, meta = FS.load_fisher(out)
    assert meta == {"task": "hopper"} and got.method == "faithful" and got.n_batches == NB
    assert int(got.n_timesteps) == int(faithful.n_timesteps)
    assert got.trace == faithful.trace and got.mean == faithful.mean
    jax.tree.map(np.testing.assert_array_equal, got.fisher, faithful.fisher)
    with pytest.raises(FileExistsError):
        FS.save_fisher(out, faithful)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), faithful)
    with pytest.raises(F.FisherError, match="one model"):
        FS.save_fisher(tmp_path / "g", stacked)
    assert not (tmp_path / "g").exists()


def _tampered(tmp_path, name, faithful, edit):
    d = tmp_path / name
    FS.save_fisher(d, faithful)
    edit(d)
    return d


def _arrays(value):
    def edit(d):
        tree = jax.tree.map(np.asarray, FS.load_fisher(d)[0].fisher)
        tree["block_1"]["ln_2"]["scale"][0] = value
        shutil.rmtree(d / "fisher")
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(str(d / "fisher"), tree)
        ckptr.wait_until_finished()
    return edit


def _json(edit_meta):
    def edit(d):
        meta = json.loads((d / "fisher.json").read_text())
        (d / "fisher.json").write_text(json.dumps(edit_meta(meta)))
    return edit


@pytest.mark.parametrize("name,edit,needle", [
    ("nan", _arrays(np.nan), "non-finite Fisher values at block_1/ln_2/scale"),
    ("negative", _arrays(-1.0), "negative Fisher values at block_1/ln_2/scale"),
    ("garbled_json", lambda d: (d / "fisher.json").write_text("{not json"), "corrupt"),
    ("not_fisher", _json(lambda m: m | {"format": "mdt_jax.dt"}), "not a Fisher artifact"),
    ("nan_trace", _json(lambda m: m | {"trace": float("nan")}), "trace"),
    ("truncated", lambda d: shutil.rmtree(d / "fisher"), "could not be read"),
])
def test_corrupt_artifacts_are_refused_naming_the_path(faithful, tmp_path, name, edit, needle):
    d = _tampered(tmp_path, name, faithful, edit)
    with pytest.raises(F.FisherError) as e:
        FS.load_fisher(d)
    assert needle in str(e.value) and str(d) in str(e.value)


def test_model_checkpoint_is_not_a_fisher(tmp_path):
    checkpoint.save(tmp_path / "model", PARAMS, CFG, {})
    with pytest.raises(F.FisherError, match="fisher.json is missing"):
        FS.load_fisher(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FS.load_fisher(tmp_path / "nowhere")


def _cli(tmp_path, workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               JAX_COMPILATION_CACHE_DIR=os.environ.get("MDT_JAX_CACHE", os.path.join(ROOT, ".jax_cache")))
    cmd = [sys.executable, "-m", "launch.fisher", "--config=configs/fisher.py",
           f"--config.checkpoint={tmp_path / 'model'}", f"--config.dataset={tmp_path / 'd.hdf5'}",
           f"--workdir={workdir}", f"--config.num_batches={NB}", f"--config.batch_size={BS}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def test_cli_uses_the_checkpoints_normalisation_and_refuses_unknown_method(tmp_path):
    stats = {"state_mean": [0.5] * 11, "state_std": [2.0] * 11}  # not the dataset's own
    checkpoint.save(tmp_path / "model", PARAMS, CFG, {"task": "hopper", "rtg_scale": 1000.0} | stats)
    ds = make_dataset(n_traj=4)
    save_d4rl_hdf5(ds, str(tmp_path / "d.hdf5"))
    r = _cli(tmp_path, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    got, meta = FS.load_fisher(tmp_path / "out")
    assert meta["tasks"] == ["hopper"] and meta["subset"] == "blocks" and got.n_batches == NB
    own = DATA.replace(state_mean=jnp.full(11, 0.5), state_std=jnp.full(11, 2.0))
    want = F.compute_fisher(CFG, PARAMS, own, jax.random.key(0), num_batches=NB, batch_size=BS)
    recomputed = F.compute_fisher(CFG, PARAMS, DATA, jax.random.key(0), num_batches=NB, batch_size=BS)
    np.testing.assert_allclose(got.trace, want.trace, rtol=1e-5)
    assert not np.isclose(got.trace, recomputed.trace, rtol=1e-3)
    # an unknown method: launch.fisher's entry refuses it (a ValueError: the CLI's exit 2,
    # tests/test_bad_inputs.py), nothing written
    from configs import fisher as fisher_config
    c = fisher_config.get_config()
    c.checkpoint, c.dataset, c.method = str(tmp_path / "model"), str(tmp_path / "d.hdf5"), "bogus"
    with pytest.raises(ValueError, match="config.method.*bogus|bogus.*config.method"):
        run.fisher_from_config(c, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_cli_multi_task_chunked_sums_equal_one_pass(tmp_path):
    """fisher_from_config adds chunk sums (resumable); over every task and with spec_info, any
    chunking gives the one-pass Fisher up to float reordering."""
    from configs import fisher as fisher_config
    from test_pipelines import SMALL, TASKS, _save_multi

    mcfg = DTConfig.multi_task(TASKS, **SMALL)
    params = init_params(mcfg, jax.random.key(0))
    paths_ = []
    for i, (t, sd, ad) in enumerate(TASKS):
        save_d4rl_hdf5(make_dataset(n_traj=5, state_dim=sd, act_dim=ad, seed=i), str(tmp_path / f"{t}.hdf5"))
        paths_.append(str(tmp_path / f"{t}.hdf5"))
    base = _save_multi(tmp_path, mcfg, params)
    ft = _save_multi(tmp_path, mcfg, params, "walker2d", "ft_walker2d")
    runs = {}
    for name, ck, ds, spec, cb in (("all_2", base, ",".join(paths_), False, 2), ("all_9", base, ",".join(paths_), False, 9),
                                   ("spec_2", ft, paths_[1], True, 2)):
        c = fisher_config.get_config()
        c.checkpoint, c.dataset, c.spec_info, c.num_batches, c.batch_size, c.chunk_batches = ck, ds, spec, 5, 8, cb
        run.fisher_from_config(c, str(tmp_path / name))
        runs[name] = FS.load_fisher(tmp_path / name)[0]
        assert not (tmp_path / f"{name}.partial").exists()
    for a, b in (("all_2", "all_9"),):
        assert runs[a].n_batches == runs[b].n_batches and int(runs[a].n_timesteps) == int(runs[b].n_timesteps)
        np.testing.assert_allclose(runs[a].trace, runs[b].trace, rtol=1e-5)
        for x, y in zip(jax.tree.leaves(runs[a].fisher), jax.tree.leaves(runs[b].fisher)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-12)
    assert runs["all_2"].n_batches == 10 and runs["spec_2"].n_batches == 5
