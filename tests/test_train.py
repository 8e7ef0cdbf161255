"""Training: loss goes down, determinism, vmapped sweeps, and exact resume after SIGKILL."""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import checkpoint, train as T
from mdt_jax.data import sample_batch, save_d4rl_hdf5, segment_data, stack_segment_data
from mdt_jax.metrics import read_jsonl
from mdt_jax.models import DTConfig
from synth import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(hidden_size=32, n_layer=2, n_head=1, context_len=5, max_ep_len=64)
TCFG = T.TrainConfig(batch_size=16, warmup_steps=20, learning_rate=1e-3)


def setup(state_dim=11, act_dim=3, seed=0):
    ds = make_dataset(state_dim=state_dim, act_dim=act_dim, seed=seed)
    cfg = DTConfig(state_dim=state_dim, act_dim=act_dim, **SMALL)
    return cfg, segment_data(ds, context_len=5, max_ep_len=64)


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_loss_decreases_and_logs(tmp_path):
    cfg, data = setup()
    T.fit(cfg, TCFG, data, num_steps=300, workdir=str(tmp_path), steps_per_call=50, checkpoint_every=300,
          progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [50, 100, 150, 200, 250, 300]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert all(r["steps_per_s"] > 0 for r in rows)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_same_seed_same_params_other_seed_differs(tmp_path):
    cfg, data = setup()
    chunk = T.make_train_chunk(cfg, TCFG, lambda d, k: sample_batch(d, k, TCFG.batch_size))
    run = lambda seed: chunk(T.init_state(cfg, TCFG, jax.random.key(seed)), data, 30)[0].params
    a, b, c = run(0), run(0), run(1)
    assert leaves_equal(a, b)
    assert not leaves_equal(a, c)


def test_vmap_over_seeds_and_learning_rates_in_one_call():
    cfg, data = setup()
    sample = lambda d, k: sample_batch(d, k, TCFG.batch_size)
    lrs = jnp.array([1e-4, 3e-4, 1e-3, 3e-3])
    keys = jax.random.split(jax.random.key(0), 4)
    states = jax.vmap(lambda k, lr: T.init_state(cfg, TCFG, k, learning_rate=lr))(keys, lrs)
    stacked = jax.tree.map(lambda x: jnp.stack([x] * 4), data)
    states, metrics = T.make_train_chunk(cfg, TCFG, sample, vmapped=True)(states, stacked, 40)
    assert metrics["loss"].shape == (4,)
    assert len({float(x) for x in metrics["loss"]}) == 4
    # member 2 equals the same model trained alone
    solo = T.make_train_chunk(cfg, TCFG, sample)(T.init_state(cfg, TCFG, keys[2], learning_rate=1e-3), data, 40)[0]
    for x, y in zip(jax.tree.leaves(solo.params), jax.tree.leaves(jax.tree.map(lambda v: v[2], states.params))):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_vmap_over_tasks_trains_three_task_models_in_one_call():
    dims = [(11, 3), (17, 6), (17, 6)]
    datas = [segment_data(make_dataset(state_dim=s, act_dim=a, seed=i), context_len=5, max_ep_len=64)
             for i, (s, a) in enumerate(dims)]
    cfg = DTConfig(state_dim=17, act_dim=6, **SMALL)  # padded to the widest task
    sample = lambda d, k: sample_batch(d[0], k, TCFG.batch_size) | {"act_dim": d[1]}
    data = (stack_segment_data(datas), jnp.array([a for _, a in dims]))
    states = jax.vmap(lambda k: T.init_state(cfg, TCFG, k))(jax.random.split(jax.random.key(0), 3))
    k0 = np.array(states.params["predict_action"]["kernel"][0])
    chunk = T.make_train_chunk(cfg, TCFG, sample, vmapped=True)
    s1, m1 = chunk(states, data, 100)
    s2, m2 = chunk(s1, data, 100)
    assert np.all(np.asarray(m2["loss"]) < np.asarray(m1["loss"]))
    # hopper's padded action dims (3..5) get no gradient: only weight decay shrinks them, uniformly
    k = np.asarray(s2.params["predict_action"]["kernel"][0])
    ratio = k[:, 3:] / k0[:, 3:]
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    assert 0.99 < ratio.flat[0] < 1.0
    assert not np.allclose(k[:, :3] / k0[:, :3], ratio.flat[0])


def test_freeze_and_init_reg():
    cfg, data = setup()
    tcfg = T.TrainConfig(batch_size=16, warmup_steps=20, learning_rate=1e-3, freeze=("ln_f", "timestep"),
                         init_reg=1e-2)
    s0 = T.init_state(cfg, tcfg, jax.random.key(0))
    p0 = jax.tree.map(np.array, s0.params)
    s1, m = T.make_train_chunk(cfg, tcfg, lambda d, k: sample_batch(d, k, 16))(s0, data, 20)
    np.testing.assert_array_equal(p0["ln_f"]["scale"], s1.params["ln_f"]["scale"])
    np.testing.assert_array_equal(p0["embed_timestep"]["embedding"], s1.params["embed_timestep"]["embedding"])
    assert not np.array_equal(p0["block_0"]["mlp"]["c_fc"]["kernel"], s1.params["block_0"]["mlp"]["c_fc"]["kernel"])
    assert np.isfinite(float(m["loss"])) and float(m["init_reg"]) > 0
    # init_reg = c * sum over trunk tensors of ||theta - theta0||_2 (unsquared)
    want = 1e-2 * sum(np.linalg.norm(np.ravel(a - b)) for a, b in
                      zip(jax.tree.leaves({k: v for k, v in s1.params.items() if k.startswith("block_")}),
                          jax.tree.leaves({k: v for k, v in p0.items() if k.startswith("block_")})))
    np.testing.assert_allclose(float(T.init_reg_loss(s1, s1.params)), want, rtol=1e-5)


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("learning_rate", -1.0), ("grad_clip", float("nan")),
                                         ("adam_b2", 1.0)])
def test_bad_train_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        T.TrainConfig(**{field: value})


def _cli(workdir, dataset, *extra):
    return [sys.executable, "-m", "launch.train", "--config=configs/train.py", "--config.task=hopper",
            f"--config.dataset={dataset}", f"--workdir={workdir}", "--config.num_steps=120",
            "--config.steps_per_call=10", "--config.checkpoint_every=20", "--config.model.hidden_size=32",
            "--config.model.n_layer=2", "--config.model.context_len=5", "--config.model.max_ep_len=64",
            "--config.train.batch_size=16", "--config.train.warmup_steps=20", *extra]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                JAX_COMPILATION_CACHE_DIR=os.environ.get("MDT_JAX_CACHE", os.path.join(ROOT, ".jax_cache")))


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    path = str(tmp_path / "d.hdf5")
    save_d4rl_hdf5(make_dataset(), path)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(full, path), cwd=ROOT, env=_env(), check=True, capture_output=True)
    proc = subprocess.Popen(_cli(killed, path), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.exists() and any(p.isdigit() for p in os.listdir(ckpts))):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    subprocess.run(_cli(killed, path), cwd=ROOT, env=_env(), check=True, capture_output=True)
    _, pa, ma = checkpoint.load(full / "model")
    _, pb, mb = checkpoint.load(killed / "model")
    assert leaves_equal(pa, pb)
    assert ma == mb and ma["steps"] == 120
    assert [r["step"] for r in read_jsonl(killed / "metrics.jsonl")][-1] == 120


# launch.train's bad overrides, missing or wrong-dims datasets and workdir collisions: the CLI
# catalogue of tests/test_bad_inputs.py (exit 2, nothing written).
