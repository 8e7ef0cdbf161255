"""The bad-input catalogue: every case gives a clear error naming the offending field or path,
exits nonzero from the CLI, and leaves existing artifacts as they were.

Library cases raise a ValueError-family error (or FileNotFoundError / FileExistsError) whose
message contains `needle`; CLI cases run the real launcher in a subprocess and check the exit
code (2), stderr, that every file under the artifact folder is byte-for-byte unchanged and that
no file was added there. The launchers' own tests call their library entries in-process for bad
configs; the exit codes are checked here, once per case.
"""
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax.behaviour.policy import load_policy
from mdt_jax import checkpoint, evaluate as ev, merge as M
from mdt_jax.data import OfflineDataset, UnsafePickleError, load_d4rl_hdf5, load_reference_pickle, save_d4rl_hdf5
from mdt_jax.data import segment_data
from mdt_jax.models import DTConfig, init_params
from mdt_jax.train import TrainConfig
from synth import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(hidden_size=16, n_layer=1, context_len=4, max_ep_len=1000)
CFG = DTConfig(state_dim=11, act_dim=3, **SMALL)


def _ds(**over):
    ds = make_dataset(n_traj=3)
    fields = dict(observations=ds.observations, actions=ds.actions, rewards=ds.rewards, terminals=ds.terminals,
                  timeouts=ds.timeouts)
    return OfflineDataset(**(fields | over))


def _params():
    return init_params(CFG, jax.random.key(0))


def _stats():
    return {"hopper": ev.TaskStats(np.zeros(11), np.ones(11), 3600.0)}


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MDT_MARKER', '/tmp/mdt_pwned')}",))


def _truncated_checkpoint(tmp):
    path = checkpoint.save(tmp / "ck", _params(), CFG)
    for root, _, files in os.walk(os.path.join(path, "params")):
        for f in files:
            p = os.path.join(root, f)
            if os.path.getsize(p) > 64:
                with open(p, "r+b") as fh:
                    fh.truncate(os.path.getsize(p) // 2)
    return path


def _corrupt_hdf5(tmp):
    p = tmp / "d.hdf5"
    save_d4rl_hdf5(make_dataset(n_traj=3), p)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    return p


LIBRARY = {
    "wrong action rows": (lambda tmp: _ds(actions=np.zeros((5, 3))), "actions"),
    "wrong observation ndim": (lambda tmp: _ds(observations=np.zeros(100)), "observations"),
    "NaN in dataset": (lambda tmp: _ds(rewards=np.full(len(make_dataset(n_traj=3).rewards), np.nan)), "rewards"),
    "Inf in dataset": (lambda tmp: _ds(observations=np.where(np.arange(11) == 3, np.inf,
                                                              make_dataset(n_traj=3).observations)), "observations"),
    "empty dataset": (lambda tmp: OfflineDataset(np.zeros((0, 11)), np.zeros((0, 3)), np.zeros(0), np.zeros(0, bool),
                                                 np.zeros(0, bool)), "empty"),
    "trajectories shorter than K": (lambda tmp: segment_data(make_dataset(n_traj=3, min_len=3, max_len=5),
                                                             context_len=20), "shorter than"),
    "missing dataset file": (lambda tmp: load_d4rl_hdf5(tmp / "nope.hdf5"), "nope.hdf5"),
    "corrupt hdf5": (lambda tmp: load_d4rl_hdf5(_corrupt_hdf5(tmp)), "d.hdf5"),
    "malicious pickle": (lambda tmp: (pickle.dump([Payload()], open(tmp / "evil.pkl", "wb")),
                                      load_reference_pickle(tmp / "evil.pkl")), "posix.system"),
    "bad model config": (lambda tmp: DTConfig(state_dim=11, act_dim=3, hidden_size=30, n_head=4), "n_head"),
    "negative learning rate": (lambda tmp: TrainConfig(learning_rate=-1e-4), "learning_rate"),
    "unknown task": (lambda tmp: ev.evaluate(CFG, _params(), ["ant"], {"ant": _stats()["hopper"]}), "ant"),
    "params for another task": (lambda tmp: ev.evaluate(CFG, _params(), ["walker2d"], _stats()), "walker2d"),
    "zero episodes": (lambda tmp: ev.evaluate(CFG, _params(), ["hopper"], _stats(), episodes=0), "episodes"),
    "unknown merge method": (lambda tmp: M.merge("slerp", M.stack([_params()] * 2)), "slerp"),
    "mismatched pytrees": (lambda tmp: M.stack([_params(), init_params(CFG.replace(hidden_size=32),
                                                                       jax.random.key(0))]), "c_attn"),
    "negative merge weight": (lambda tmp: M.weighted_average(M.stack([_params()] * 2), jnp.array([-1.0, 1.0])),
                              "weights"),
    "out-of-range lerp": (lambda tmp: M.lerp(_params(), _params(), 2.0), "p must be"),
    "NaN in params": (lambda tmp: M.stack([_params(), jax.tree.map(lambda x: x * np.nan, _params())]), "model 1"),
    "NaN Fisher": (lambda tmp: M.fisher_weighted(M.stack([_params()] * 2),
                                                 jax.tree.map(lambda x: jnp.stack([x * np.nan] * 2), _params())),
                   "Fisher"),
    "truncated checkpoint": (lambda tmp: checkpoint.load(_truncated_checkpoint(tmp)), "ck"),
    "not a DT checkpoint": (lambda tmp: (os.makedirs(tmp / "junk"), checkpoint.load(tmp / "junk")), "not an mdt_jax"),
    "checkpoint over an existing one": (lambda tmp: [checkpoint.save(tmp / "c2", _params(), CFG) for _ in range(2)],
                                        "already exists"),
    "corrupt policy checkpoint": (lambda tmp: (os.makedirs(tmp / "pol"), (tmp / "pol" / "policy.json").write_text("{x"),
                                               load_policy(tmp / "pol")), "corrupt"),
    "NaN params not saved": (lambda tmp: checkpoint.save(tmp / "c3", jax.tree.map(lambda x: x * np.nan, _params()),
                                                         CFG), "non-finite"),
}


@pytest.mark.parametrize("case", sorted(LIBRARY))
def test_library_case(case, tmp_path, monkeypatch):
    monkeypatch.setenv("MDT_MARKER", str(tmp_path / "pwned"))
    make, needle = LIBRARY[case]
    with pytest.raises((ValueError, FileNotFoundError, FileExistsError)) as e:
        make(tmp_path)
    assert needle in str(e.value), str(e.value)
    assert not (tmp_path / "pwned").exists()


def _digest(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    save_d4rl_hdf5(make_dataset(n_traj=4), tmp / "hopper.hdf5")
    ck = checkpoint.save(tmp / "model", _params(), CFG,
                         {"task": "hopper", "state_mean": [0.0] * 11, "state_std": [1.0] * 11})
    (tmp / "run").mkdir()
    (tmp / "run" / "run_config.json").write_text('{"task": "walker2d"}')
    (tmp / "evalout").mkdir()
    (tmp / "evalout" / "eval.json").write_text('{"keep": true}')
    (tmp / "mergeout").mkdir()
    (tmp / "mergeout" / "merge.json").write_text('{"keep": true}')
    (tmp / "brun").mkdir()
    (tmp / "brun" / "run.json").write_text('{"task": "walker2d", "seed": 0}')
    return tmp, ck


def _train(tmp, *extra):
    return ["launch.train", "--config.task=hopper", f"--config.dataset={tmp / 'hopper.hdf5'}", "--config.num_steps=2",
            "--config.model.hidden_size=16", "--config.model.n_layer=1", *extra]


CLI = {
    "unknown config field": (lambda t, ck: _train(t, "--config.bogus=1", f"--workdir={t / 'w1'}"), "bogus"),
    "unknown field, explicit --config": (lambda t, ck: ["launch.train", "--config=configs/train.py",
                                                        *_train(t, "--config.bogus=1", f"--workdir={t / 'w1'}")[1:]],
                                         "bogus"),
    "unknown Fisher method": (lambda t, ck: ["launch.fisher", f"--config.checkpoint={ck}", "--config.method=bogus",
                                             f"--config.dataset={t / 'hopper.hdf5'}", f"--workdir={t / 'w4'}"],
                              "bogus"),
    "unknown nested field": (lambda t, ck: _train(t, "--config.train.lr=1", f"--workdir={t / 'w1'}"), "lr"),
    "bad value type": (lambda t, ck: _train(t, "--config.train.learning_rate=fast", f"--workdir={t / 'w1'}"),
                       "learning_rate"),
    "out-of-range value": (lambda t, ck: _train(t, "--config.train.batch_size=-4", f"--workdir={t / 'w1'}"),
                           "batch_size"),
    "unknown task": (lambda t, ck: _train(t, "--config.task=ant", f"--workdir={t / 'w1'}"), "ant"),
    "unknown activation": (lambda t, ck: _train(t, "--config.model.activation=swish", f"--workdir={t / 'w1'}"),
                           "activation"),
    "missing dataset": (lambda t, ck: ["launch.train", "--config.task=hopper", f"--config.dataset={t / 'nope.hdf5'}",
                                       f"--workdir={t / 'w1'}"], "nope.hdf5"),
    "dataset of another task": (lambda t, ck: _train(t, "--config.task=walker2d", f"--workdir={t / 'w1'}"),
                                "(17, 6)"),
    "workdir collision": (lambda t, ck: _train(t, f"--workdir={t / 'run'}"), "different run"),
    "evaluate a non-DT folder": (lambda t, ck: ["launch.evaluate", f"--config.checkpoint={t / 'run'}",
                                                f"--workdir={t / 'evalout'}"], "not an mdt_jax"),
    "evaluate zero episodes": (lambda t, ck: ["launch.evaluate", f"--config.checkpoint={ck}", "--config.episodes=0",
                                              f"--workdir={t / 'evalout'}"], "episodes"),
    "merge into an existing merge": (lambda t, ck: ["launch.merge", f"--config.checkpoints={ck},{ck}",
                                                    f"--workdir={t / 'mergeout'}"], "merge.json"),
    "merge unknown pipeline": (lambda t, ck: ["launch.merge", "--config.pipeline=p7", f"--config.checkpoints={ck},{ck}",
                                              f"--workdir={t / 'w2'}"], "p7"),
    "convert a missing file": (lambda t, ck: ["launch.convert", "--from=hf", f"--src={t / 'none'}",
                                              f"--out={t / 'w3'}"], "none"),
    "collect an unknown quality": (lambda t, ck: ["launch.collect", "--config.quality=legendary",
                                                  f"--workdir={t / 'w5'}"], "legendary"),
    "behaviour: bad SAC override": (lambda t, ck: ["launch.train_behaviour", "--config.sac.batch_size=0",
                                                   f"--workdir={t / 'w6'}"], "sac.batch_size"),
    "behaviour: unknown task": (lambda t, ck: ["launch.train_behaviour", "--config.task=ant",
                                               f"--workdir={t / 'w6'}"], "ant"),
    "behaviour: workdir of another run": (lambda t, ck: ["launch.train_behaviour", "--config.env_steps=100",
                                                         f"--workdir={t / 'brun'}"], "another config"),
    "select behaviour without policies": (lambda t, ck: ["launch.select_behaviour", f"--workdir={t / 'run'}"],
                                          "no behaviour policies"),
    "select behaviour: bad medium range": (lambda t, ck: ["launch.select_behaviour", "--config.medium_min=0.7",
                                                          f"--workdir={t / 'brun'}"], "medium_min"),
}


@pytest.mark.parametrize("case", sorted(CLI))
def test_cli_case(case, artifacts):
    tmp, ck = artifacts
    before = _digest(tmp)
    args, needle = CLI[case]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", *args(tmp, ck)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert needle in r.stderr, r.stderr[-1500:]
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    after = _digest(tmp)
    assert {k: v for k, v in after.items() if k in before} == before, "an existing artifact changed"
    assert set(after) == set(before), f"written: {sorted(set(after) - set(before))}"


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, {tests!r})
    from synth import make_dataset
    from mdt_jax.data import save_d4rl_hdf5
    ds = make_dataset(n_traj=40, min_len=200, max_len=300)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    try:
        save_d4rl_hdf5(ds, {path!r}, overwrite=True)
    except Exception as e:
        print("error:", type(e).__name__, e, file=sys.stderr)
        sys.exit(2)
""")


def test_disk_full_leaves_the_existing_file_intact(tmp_path):
    """A real write failure (file-size limit as a stand-in for a full disk) mid-save."""
    path = tmp_path / "data.hdf5"
    save_d4rl_hdf5(make_dataset(n_traj=2), path)
    before = path.read_bytes()
    code = DISK_FULL.format(tests=os.path.dirname(os.path.abspath(__file__)), path=str(path))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-1500:]
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["data.hdf5"], "a temp file was left behind"
    assert len(load_d4rl_hdf5(path).rewards) == len(make_dataset(n_traj=2).rewards)
