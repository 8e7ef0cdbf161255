"""Grouped training (`training.train_group`): same-shaped runs in one vmapped program end as the
runs trained alone (`training.train_run`) would, to float tolerance; resume is bit-exact; bad groups
are refused before anything is written."""
import json
import os

import jax
import numpy as np
import pytest

from mdt_jax import checkpoint
from mdt_jax.data import save_d4rl_hdf5
from mdt_jax.models.dt import param_shapes
from mdt_jax.training import TrainRun, task_dims, train_group, train_run
from synth import make_dataset

MODEL = dict(hidden_size=16, n_layer=1, n_head=1, context_len=5, max_ep_len=64)
TRAIN = dict(batch_size=8, warmup_steps=5, learning_rate=1e-3)
TASKS = ("hopper", "walker2d", "halfcheetah")  # (11, 3), (17, 6), (17, 6)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    out = {}
    for i, t in enumerate(TASKS):
        s, a = task_dims(t)
        path = str(root / f"{t}.hdf5")
        # one length for every task: the runs alone of same-dim tasks compile one program
        save_d4rl_hdf5(make_dataset(n_traj=8, state_dim=s, act_dim=a, seed=i, min_len=20, max_len=20), path)
        out[t] = path
    return out


def _run(task, data, seed, **fields):
    base = dict(task=(task,), dataset=(data[task],), seed=seed, num_steps=20, steps_per_call=10, checkpoint_every=10,
                log_every=10, model=MODEL, train=TRAIN)
    return TrainRun(**(base | fields))


def _assert_close(a, b, hidden: int):
    """Every param to float tolerance, but the attention's key bias: softmax is shift-invariant, so
    its gradient is 0 up to rounding and Adam scales that rounding noise to learning-rate-sized
    steps, which differ with the summation order (it changes no output)."""
    fa, fb = checkpoint.tree_paths(a), checkpoint.tree_paths(b)
    assert set(fa) == set(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        if k.endswith("attn/c_attn/bias"):
            x, y = np.delete(x, np.s_[hidden:2 * hidden]), np.delete(y, np.s_[hidden:2 * hidden])
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6, err_msg=k)


def _actions(model, seed=0):
    from mdt_jax.models.dt import apply

    cfg, K = model.cfg, model.cfg.context_len
    r = np.random.default_rng(seed)
    x = lambda *s: np.asarray(r.normal(size=s), np.float32)
    return np.asarray(apply(cfg, model.params, x(4, K, cfg.state_dim), x(4, K, cfg.act_dim), x(4, K, 1),
                            np.tile(np.arange(K), (4, 1)), task_id=np.zeros(4, np.int32) if cfg.multi else None))


def _assert_same_model(grouped_dir, alone_dir):
    g, a = checkpoint.load(grouped_dir), checkpoint.load(alone_dir)
    assert g.cfg == a.cfg and g.tasks == a.tasks
    assert g.metadata == a.metadata
    assert g.norms.keys() == a.norms.keys() and all(g.norms[t] == a.norms[t] for t in g.norms)
    checkpoint.check_params(a.cfg, g.params)  # the real shapes, not the group's padded ones
    _assert_close(g.params, a.params, a.cfg.hidden_size)
    np.testing.assert_allclose(_actions(g), _actions(a), rtol=1e-4, atol=1e-5)
    return g


def _single_runs(datasets):
    runs = [_run(t, datasets, seed=3 + i, init_seed=50) for i, t in enumerate(TASKS)]
    return [runs[0].replace(init_seed=-1)] + runs[1:]  # the first one's init from its seed (the default)


@pytest.fixture(scope="module")
def single(datasets, tmp_path_factory):
    """The three single-task runs trained alone and as one group."""
    root = tmp_path_factory.mktemp("single")
    runs = _single_runs(datasets)
    alone = [train_run(r, str(root / "alone" / t)) for r, t in zip(runs, TASKS)]
    wds = [str(root / "grouped" / t) for t in TASKS]
    got = train_group(runs, wds, group_dir=str(root / "group"), progress=False)
    return runs, alone, wds, got, root


def test_single_task_dts_of_different_tasks_grouped_equal_alone(single):
    runs, alone, wds, got, root = single
    assert got == [os.path.join(w, "model") for w in wds]
    for g, a, t in zip(got, alone, TASKS):
        m = _assert_same_model(g, a)
        assert (m.cfg.state_dim, m.cfg.act_dim) == task_dims(t)
    # training moved the params away from the init (the comparison is not of two inits)
    from mdt_jax.train import init_params_for_seed
    m = checkpoint.load(got[1])
    init = init_params_for_seed(m.cfg, 50)
    assert not np.allclose(m.params["block_0"]["mlp"]["c_fc"]["kernel"], init["block_0"]["mlp"]["c_fc"]["kernel"])
    # the members' workdirs hold their runs' configs, as train_run's do: train_run there finds the model
    with open(os.path.join(wds[2], "run_config.json")) as f, open(root / "alone" / TASKS[2] / "run_config.json") as g:
        assert json.load(f) == json.load(g)
    assert train_run(runs[2], wds[2]) == os.path.join(wds[2], "model")
    with open(root / "group" / "members.json") as f:
        rec = json.load(f)
    assert [m["workdir"] for m in rec["members"]] == wds
    assert (rec["model"]["state_dim"], rec["model"]["act_dim"]) == (17, 6)


def _multi_task_checkpoint(datasets, path):
    """A multi-task DT checkpoint (a fresh init with its tasks' normalisers) to finetune."""
    from mdt_jax.data import Normalizer, load_task_data
    from mdt_jax.models.dt import DTConfig
    from mdt_jax.train import init_params_for_seed

    tasks = ("hopper", "walker2d")
    cfg = DTConfig.multi_task([(t, *task_dims(t)) for t in tasks], **(MODEL | {"n_head": 2}))
    norms = {t: Normalizer.of(load_task_data(datasets[t], t, cfg)) for t in tasks}
    return checkpoint.save(path, init_params_for_seed(cfg, 1), cfg, {"kind": "multi_task"}, norms=norms)


def test_multi_task_finetunes_grouped_equal_alone(datasets, tmp_path):
    mt = _multi_task_checkpoint(datasets, str(tmp_path / "mt"))
    ft_train = TRAIN | {"freeze": "ln_f,embed_timestep", "init_reg": 1e-4}
    runs = [_run(t, datasets, seed=91 + i, init_from=mt, train=ft_train) for i, t in enumerate(("hopper", "walker2d"))]
    alone = [train_run(r, str(tmp_path / "alone" / f"ft_{i}")) for i, r in enumerate(runs)]
    wds = [str(tmp_path / "grouped" / f"ft_{i}") for i in range(2)]
    got = train_group(runs, wds, group_dir=str(tmp_path / "group"), progress=False)
    for g, a in zip(got, alone):
        assert _assert_same_model(g, a).metadata["kind"] == "multi_task_finetune"
    # the frozen params did not move in the group either
    base = checkpoint.load(mt).params
    np.testing.assert_array_equal(checkpoint.load(got[1]).params["ln_f"]["scale"], base["ln_f"]["scale"])


def test_p1_finetunes_of_single_task_merges_grouped_equal_alone(single, datasets, tmp_path):
    """The study's P1 second step as one group: single-task DTs of different tasks, each from its
    own (merged) checkpoint with attn+mlp frozen, end as each run alone would; the frozen params
    stay bitwise those of their checkpoint."""
    from mdt_jax.pipelines import P1_FREEZE

    _, _, _, trained, _ = single
    ft = TRAIN | {"freeze": ",".join(P1_FREEZE)}
    runs = [_run(t, datasets, seed=70, init_from=m, train=ft, num_steps=10) for t, m in zip(TASKS, trained)]
    alone = [train_run(r, str(tmp_path / "alone" / t)) for r, t in zip(runs, TASKS)]
    got = train_group(runs, [str(tmp_path / "g" / t) for t in TASKS], group_dir=str(tmp_path / "group"),
                      progress=False)
    for g, a, src in zip(got, alone, trained):
        m = _assert_same_model(g, a)
        base = checkpoint.load(src).params
        np.testing.assert_array_equal(m.params["block_0"]["mlp"]["c_fc"]["kernel"],
                                      base["block_0"]["mlp"]["c_fc"]["kernel"])
        np.testing.assert_array_equal(m.params["block_0"]["attn"]["c_attn"]["kernel"],
                                      base["block_0"]["attn"]["c_attn"]["kernel"])
        assert not np.array_equal(m.params["embed_state"]["kernel"], base["embed_state"]["kernel"])


def test_study_fishers_alone_with_grouping_off_and_grouped_otherwise(single, datasets, tmp_path):
    """`config.group.mode` 'off' computes each Fisher alone (`fisher_run`, bitwise the pre-grouping
    study's); otherwise one grouped call, equal to float tolerance."""
    from mdt_jax import reproduce as R
    from mdt_jax.fisher_stage import FisherRun, fisher_run, load_fishers

    _, _, _, models, _ = single
    data = [datasets[t] for t in TASKS]
    cfg_off, cfg_on = _study_config(mode="off"), _study_config(mode="on")
    off = R._fishers(cfg_off, [str(tmp_path / "off" / t) for t in TASKS], models, data, seed=0)
    on = R._fishers(cfg_on, [str(tmp_path / "on" / t) for t in TASKS], models, data, seed=0)
    fields = R.config_dict(cfg_off.fisher) | {"seed": 0}
    for m, d, t, a, b in zip(models, data, TASKS, off, on):
        fisher_run(FisherRun(**(fields | {"checkpoint": m, "dataset": (d,)})), str(tmp_path / "ref" / t))
        ref, = load_fishers([str(tmp_path / "ref" / t)])
        assert _equal(load_fishers([a])[0], ref)
        for x, y in zip(jax.tree.leaves(load_fishers([b])[0]), jax.tree.leaves(ref)):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-12)


def test_multi_task_dts_across_seeds_grouped_equal_alone(datasets, tmp_path):
    tasks = ("hopper", "walker2d")
    runs = [TrainRun(task=tasks, dataset=tuple(datasets[t] for t in tasks), seed=90 + 100 * s, num_steps=10,
                     steps_per_call=10, checkpoint_every=10, model=MODEL | {"n_head": 2}, train=TRAIN) for s in (0, 1)]
    alone = train_run(runs[1], str(tmp_path / "alone"))
    got = train_group(runs, [str(tmp_path / f"g{s}") for s in (0, 1)], group_dir=str(tmp_path / "group"),
                      progress=False)
    assert _assert_same_model(got[1], alone).metadata["kind"] == "multi_task"
    assert not _equal(checkpoint.load(got[0]).params, checkpoint.load(got[1]).params)


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_interrupted_group_resumes_bit_exactly(single, tmp_path):
    runs, _, _, full, _ = single
    wds = [str(tmp_path / "cut" / t) for t in TASKS]
    gdir = str(tmp_path / "g_cut")
    train_group(runs, wds, group_dir=gdir, progress=False, stop_after=10)
    assert not any(os.path.exists(os.path.join(w, "model")) for w in wds)
    assert os.path.isdir(os.path.join(gdir, "checkpoints", "10"))
    # a rerun with other members is refused, naming the field
    with pytest.raises(ValueError, match=r"config\.seed"):
        train_group([runs[0], runs[1].replace(seed=7), runs[2]], wds, group_dir=gdir, progress=False)
    got = train_group(runs, wds, group_dir=gdir, progress=False)
    for g, f in zip(got, full):
        a, b = checkpoint.load(g), checkpoint.load(f)
        assert a.metadata == b.metadata and _equal(a.params, b.params)
    # a kill between the members' saves: the rerun saves the missing one from the group's last
    # checkpoint and leaves the saved ones as they were
    import shutil
    shutil.rmtree(os.path.join(wds[1], "model"))
    mtime = os.path.getmtime(os.path.join(wds[0], "model", checkpoint.META_FILE))
    again = train_group(runs, wds, group_dir=gdir, progress=False)
    assert os.path.getmtime(os.path.join(wds[0], "model", checkpoint.META_FILE)) == mtime
    assert _equal(checkpoint.load(again[1]).params, checkpoint.load(full[1]).params)
    # every member present: nothing is built or read
    assert train_group(runs, wds, group_dir="/nonexistent/never", progress=False) == again


@pytest.mark.parametrize("change,needle", [
    (dict(num_steps=30), r"config\.num_steps"),
    (dict(model=dict(hidden_size=32)), r"config\.model\.hidden_size"),
    (dict(train=dict(learning_rate=3e-4)), r"config\.train\.learning_rate"),
])
def test_mismatched_members_are_refused_before_anything_is_written(datasets, tmp_path, change, needle):
    runs = [_run("hopper", datasets, 0), _run("walker2d", datasets, 1).replace(**change)]
    with pytest.raises(ValueError, match=needle):
        train_group(runs, [str(tmp_path / "a"), str(tmp_path / "b")], group_dir=str(tmp_path / "g"))
    assert os.listdir(tmp_path) == []


def test_unsupported_and_too_large_groups_are_refused(datasets, tmp_path):
    runs = [_run("hopper", datasets, 0), _run("walker2d", datasets, 1)]
    wds = [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(ValueError, match=r"save_mode='best' is not supported"):
        train_group([r.replace(save_mode="best", eval_every=10, select_episodes=1) for r in runs], wds,
                    group_dir=str(tmp_path / "g"))
    with pytest.raises(ValueError, match=r"max_bytes \(config\.group\.max_bytes\)"):
        train_group(runs, wds, group_dir=str(tmp_path / "g"), max_bytes=10_000)
    with pytest.raises(ValueError, match="single_task model and run 1 a multi_task"):
        train_group([runs[0], runs[1].replace(task=("hopper", "walker2d"),
                                              dataset=(datasets["hopper"], datasets["walker2d"]))], wds,
                    group_dir=str(tmp_path / "g"))
    assert os.listdir(tmp_path) == []


def test_memory_estimate_counts_the_stacked_state():
    from mdt_jax.models.dt import DTConfig
    from mdt_jax.train import TrainConfig
    from mdt_jax.training import estimate_group_bytes

    cfg = DTConfig(state_dim=17, act_dim=6, **MODEL)
    tcfg = TrainConfig(**TRAIN)
    one, four = (estimate_group_bytes(cfg, tcfg, "single_task", n) for n in (1, 4))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(cfg)))
    # params + Adam's two moments, float32, per model (+ a few scalars)
    assert 3 * 4 * n_params <= one["state"] < 3 * 4 * n_params + 1024
    assert four["state"] > 4 * 3 * 4 * n_params and four["activations"] == 4 * one["activations"]
    assert four["total"] == sum(v for k, v in four.items() if k != "total")


@pytest.mark.parametrize("H,L,heads,K,B,G", [(32, 2, 1, 20, 32, 6), (64, 2, 2, 20, 64, 4)])
def test_memory_estimate_bounds_the_compiled_programs_peak(H, L, heads, K, B, G):
    """The estimate from shapes is an upper bound of what XLA's compiled grouped step holds at
    once (its buffers' temp + argument bytes, `memory_analysis`), and not far above it."""
    import jax.numpy as jnp

    from mdt_jax import train as T
    from mdt_jax.models.dt import DTConfig
    from mdt_jax.training import _data_struct, estimate_group_bytes, group_sample

    cfg = DTConfig(state_dim=17, act_dim=6, hidden_size=H, n_layer=L, n_head=heads, context_len=K, max_ep_len=1000)
    tcfg = T.TrainConfig(batch_size=B)
    est = estimate_group_bytes(cfg, tcfg, "single_task", G)["total"]
    state = jax.eval_shape(lambda: jax.vmap(lambda s: T.init_state(cfg, tcfg, jax.random.key(s)))(jnp.arange(G)))
    data = jax.eval_shape(lambda: jax.tree.map(lambda x: jnp.zeros((G,) + x.shape, x.dtype),
                                               _data_struct("single_task", cfg)))
    chunk = T.make_train_chunk(cfg, tcfg, group_sample("single_task", B), vmapped=True)
    ma = chunk.lower(state, data, 1).compile().memory_analysis()
    peak = ma.temp_size_in_bytes + ma.argument_size_in_bytes
    assert peak <= est <= 1.5 * peak, (peak, est)


def _study_config(**group):
    import tiny_study

    c = tiny_study.get_config()
    for k, v in group.items():
        c.group[k] = v
    return c


@pytest.mark.parametrize("field,value,needle", [
    ("mode", "sometimes", "config.group.mode"),
    ("max_models", -1, "config.group.max_models"),
    ("max_models", 1, "config.group.max_models"),
    ("max_bytes", -5, "config.group.max_bytes"),
])
def test_study_group_config_is_checked(field, value, needle):
    from mdt_jax import reproduce as R

    with pytest.raises(ValueError, match=needle):
        R.check_config(_study_config(**{field: value}))


def test_study_group_over_the_memory_budget_stops_before_anything_is_written(datasets, tmp_path):
    """The study's grouped stage refuses a group that does not fit `config.group.max_bytes`,
    estimated from the shapes, before any member's workdir or the group's is made (and so before
    any results.json); with mode 'off' it trains nothing."""
    from mdt_jax import reproduce as R

    data = {t: datasets[t] for t in ("hopper", "walker2d")}
    with pytest.raises(ValueError, match=r"max_bytes \(config\.group\.max_bytes\)"):
        R.train_groups(_study_config(max_bytes=4096), str(tmp_path / "w"), ["hopper", "walker2d"], data, [0, 1])
    R.train_groups(_study_config(mode="off"), str(tmp_path / "w"), ["hopper", "walker2d"], data, [0, 1])
    assert os.listdir(tmp_path) == []
