"""Dataset container, file formats (against their real writers) and the jitted segment sampler."""
import os
import pickle

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mdt_jax.data import (
    OfflineDataset, UnsafePickleError, gather_segments, load_d4rl_hdf5, load_dataset, load_minari,
    load_reference_pickle, sample_batch, sample_multitask, save_d4rl_hdf5, save_reference_pickle,
    segment_data, stack_segment_data,
)


def make_dataset(lens, S=4, A=2, seed=0, last_terminal=True, next_obs=True):
    """Trajectories of the given lengths; alternately ending in terminal / timeout."""
    rng = np.random.default_rng(seed)
    n = sum(lens)
    ends = np.cumsum(lens) - 1
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[ends[::2]] = True
    timeouts[ends[1::2]] = True
    if not last_terminal:
        terminals[-1] = timeouts[-1] = False
    obs = rng.normal(size=(n, S)).astype(np.float32) * 3 + 1
    return OfflineDataset(obs, rng.uniform(-1, 1, (n, A)), rng.normal(size=n), terminals, timeouts,
                          next_observations=obs + 0.5 if next_obs else None, metadata={"env": "toy", "seed": seed})


def assert_same(a: OfflineDataset, b: OfflineDataset):
    for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations"):
        x, y = getattr(a, k), getattr(b, k)
        assert (x is None) == (y is None), k
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), k


# ----------------------------------------------------------------------------- OfflineDataset


def test_trajectory_bounds_and_round_trip():
    ds = make_dataset([3, 5, 2, 4], last_terminal=False)
    starts, lens = ds.trajectory_bounds()
    np.testing.assert_array_equal(starts, [0, 3, 8, 10])
    np.testing.assert_array_equal(lens, [3, 5, 2, 4])  # the unfinished tail is a trajectory
    trajs = ds.to_trajectories()
    assert sorted(trajs[0]) == ["actions", "next_observations", "observations", "rewards", "terminals"]
    np.testing.assert_array_equal(trajs[1]["actions"], ds.actions[3:8])
    back = OfflineDataset.from_trajectories(trajs)
    np.testing.assert_array_equal(back.terminals, ds.terminals)
    assert [len(t["rewards"]) for t in back.to_trajectories()] == [3, 5, 2, 4]
    assert back.timeouts[-1]  # the tail comes back closed by a timeout


@pytest.mark.parametrize("change, match", [
    (dict(actions=np.array([[0.0, 1.0]] * 3 + [[0.0, np.nan]] + [[0.0, 0.0]] * 6)), r"actions.*nan.*\(3, 1\)"),
    (dict(rewards=np.r_[np.zeros(7), np.inf, np.zeros(2)]), r"rewards.*inf.*\(7,\)"),
    (dict(terminals=np.zeros(9, bool)), "terminals: 9 rows, but rewards has 10"),
    (dict(observations=np.zeros(10)), r"observations: expected 2 dims"),
    (dict(next_observations=np.zeros((10, 3))), "next_observations: shape"),
])
def test_validate_names_field(change, match):
    ds = make_dataset([4, 6])
    fields = {k: getattr(ds, k) for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                          "next_observations")}
    with pytest.raises(ValueError, match=match):
        OfflineDataset(**{**fields, **change})


def test_validate_empty_and_bad_trajectories():
    with pytest.raises(ValueError, match="empty dataset"):
        OfflineDataset(np.zeros((0, 3)), np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0))
    traj = make_dataset([5]).to_trajectories()[0]
    with pytest.raises(ValueError, match="trajectory 1: missing key 'actions'"):
        OfflineDataset.from_trajectories([traj, {k: v for k, v in traj.items() if k != "actions"}])
    with pytest.raises(ValueError, match="trajectory 0: 'terminals' set before the last step"):
        OfflineDataset.from_trajectories([{**traj, "terminals": np.eye(5, dtype=bool)[1]}])


# ---------------------------------------------------------------------------------- D4RL hdf5


def write_d4rl_file(path, ds):
    """A file laid out like D4RL's own hdf5 releases, written with h5py as D4RL did."""
    with h5py.File(path, "w") as f:
        for k in ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts"):
            f.create_dataset(k, data=getattr(ds, k), compression="gzip")
        f.create_dataset("infos/qpos", data=np.zeros((len(ds), 6)))
        f["metadata/algorithm"] = "SAC"


def test_load_real_d4rl_layout(tmp_path):
    ds = make_dataset([30, 20, 15])
    write_d4rl_file(tmp_path / "hopper-medium-v2.hdf5", ds)
    got = load_dataset(tmp_path / "hopper-medium-v2.hdf5")
    assert_same(got, ds)
    assert got.metadata == {}


def test_hdf5_round_trip_atomic_and_no_clobber(tmp_path):
    ds, path = make_dataset([30, 20]), tmp_path / "d.h5"
    save_d4rl_hdf5(ds, path)
    got = load_d4rl_hdf5(path)
    assert_same(got, ds)
    assert got.metadata == ds.metadata
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 1
    with pytest.raises(FileExistsError, match=str(path)):
        save_d4rl_hdf5(ds, path)
    object.__setattr__(ds, "actions", np.array([object()] * len(ds)))  # h5py fails mid-write
    with pytest.raises(TypeError):
        save_d4rl_hdf5(ds, path, overwrite=True)
    assert_same(load_d4rl_hdf5(path), got)  # the old file is untouched
    assert os.listdir(tmp_path) == ["d.h5"]  # and no temp file is left behind
    save_d4rl_hdf5(make_dataset([7], next_obs=False), path, overwrite=True)
    assert len(load_d4rl_hdf5(path)) == 7 and load_d4rl_hdf5(path).next_observations is None


def test_hdf5_bad_files(tmp_path):
    path = tmp_path / "d.hdf5"
    write_d4rl_file(path, make_dataset([200, 100], S=11))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path}: not a readable hdf5"):
        load_d4rl_hdf5(path)
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=f"{path}: not a readable hdf5"):
        load_d4rl_hdf5(path)
    with h5py.File(path, "w") as f:
        for k in ("observations", "actions", "rewards", "terminals"):
            f[k] = np.zeros((3, 2) if k in ("observations", "actions") else 3)
    with pytest.raises(ValueError, match=f"{path}: missing dataset 'timeouts'"):
        load_d4rl_hdf5(path)
    with pytest.raises(FileNotFoundError, match="nope.hdf5"):
        load_d4rl_hdf5(tmp_path / "nope.hdf5")


# ---------------------------------------------------------------------------- reference pickle


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reference_pickle_from_pickle_dump(tmp_path, protocol):
    ds = make_dataset([12, 9, 4])
    path = tmp_path / "hopper-medium-v2.pkl"
    with open(path, "wb") as f:  # what the reference's D4RL download script does
        pickle.dump(ds.to_trajectories(), f, protocol=protocol)
    assert_same(load_dataset(path), ds)


def test_reference_pickle_numpy1_paths_and_round_trip(tmp_path):
    ds = make_dataset([6, 5])
    blob = pickle.dumps(ds.to_trajectories(), protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in blob
    (tmp_path / "old.pkl").write_bytes(blob.replace(b"numpy._core.", b"numpy.core."))  # a numpy 1.x pickle
    assert_same(load_reference_pickle(tmp_path / "old.pkl"), ds)
    save_reference_pickle(ds, tmp_path / "new.pkl")
    with pytest.raises(FileExistsError):
        save_reference_pickle(ds.to_trajectories(), tmp_path / "new.pkl")
    assert_same(load_reference_pickle(tmp_path / "new.pkl"), ds)


class _Exploit:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("fn, name", [(os.system, "posix.system"), (eval, "builtins.eval")])
def test_malicious_pickle_is_refused(tmp_path, fn, name):
    marker = tmp_path / "pwned"
    cmd = f"touch {marker}" if fn is os.system else f"open({str(marker)!r}, 'w').close()"
    traj = {**make_dataset([3]).to_trajectories()[0], "rewards": _Exploit(fn, cmd)}
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([traj]))
    with pytest.raises(UnsafePickleError, match=f"{path}: refusing to load global {name}"):
        load_reference_pickle(path)
    assert not marker.exists()


def test_pickle_bad_files(tmp_path):
    path = tmp_path / "t.pkl"
    path.write_bytes(pickle.dumps(make_dataset([5]).to_trajectories())[:-40])
    with pytest.raises(ValueError, match=f"{path}: not a readable pickle"):
        load_reference_pickle(path)
    path.write_bytes(pickle.dumps({"observations": 1}))
    with pytest.raises(ValueError, match="expected a list"):
        load_reference_pickle(path)
    with pytest.raises(ValueError, match="unknown dataset spec"):
        load_dataset(tmp_path / "x.npz")


# ------------------------------------------------------------------------------------- Minari


def test_minari_dataset_from_data_collector(tmp_path, monkeypatch):
    import gymnasium as gym
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    env = minari.DataCollector(gym.make("Hopper-v5", max_episode_steps=25))
    env.action_space.seed(0)
    expected = {k: [] for k in ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")}
    for ep in range(4):
        obs, _ = env.reset(seed=ep)
        done = False
        while not done:  # episode 0 stands still (truncated at 25), the random ones fall (terminated)
            action = np.zeros(3, np.float32) if ep == 0 else env.action_space.sample()
            nxt, reward, term, trunc, _ = env.step(action)
            for k, v in zip(expected, (obs, nxt, action, reward, term, trunc)):
                expected[k].append(v)
            obs, done = nxt, term or trunc
    env.create_dataset("test/hopper/random-v0", eval_env="Hopper-v5", algorithm_name="random",
                       author="test", author_email="test@example.com", code_permalink="none", description="test")
    env.close()
    expected = OfflineDataset(**{k: np.array(v) for k, v in expected.items()})
    assert expected.terminals.any() and expected.timeouts.any()
    got = load_dataset("minari:test/hopper/random-v0")
    assert_same(got, expected)
    assert got.metadata == {"source": "minari", "dataset_id": "test/hopper/random-v0", "env_id": "Hopper-v5"}
    monkeypatch.delenv("MINARI_DATASETS_PATH")
    assert_same(load_minari("test/hopper/random-v0", root=tmp_path), expected)
    with pytest.raises(FileNotFoundError, match="test/hopper/other-v0"):
        load_minari("test/hopper/other-v0", root=tmp_path)


# -------------------------------------------------------------------------------------- sampler


def reference_get_batch(trajectories, picks, K, max_ep_len, scale, state_mean, state_std):
    """The reference's get_batch (experiment.py) with the (trajectory, si) draws given."""
    out = {k: [] for k in ("states", "actions", "rtg", "timesteps", "mask")}
    for ti, si in picks:
        traj = trajectories[ti]
        s = traj["observations"][si:si + K]
        a = traj["actions"][si:si + K]
        tlen = len(s)
        ts = np.arange(si, si + tlen)
        ts[ts >= max_ep_len] = max_ep_len - 1
        rewards = traj["rewards"][si:].astype(np.float64)
        rtg = np.cumsum(rewards[::-1])[::-1][:tlen + 1]
        if len(rtg) <= tlen:
            rtg = np.r_[rtg, 0.0]
        pad = K - tlen
        out["states"].append((np.r_[np.zeros((pad, s.shape[1])), s] - state_mean) / state_std)
        out["actions"].append(np.r_[np.full((pad, a.shape[1]), -10.0), a])
        out["rtg"].append((np.r_[np.zeros(pad), rtg] / scale)[:-1, None])  # the model sees rtg[:, :-1]
        out["timesteps"].append(np.r_[np.zeros(pad, int), ts])
        out["mask"].append(np.r_[np.zeros(pad), np.ones(tlen)])
    return {k: np.stack(v) for k, v in out.items()}


def test_gather_matches_reference_get_batch():
    ds = make_dataset([12, 3, 25, 8], S=5, A=3, seed=1, last_terminal=False)
    data = segment_data(ds, context_len=6, max_ep_len=10, rtg_scale=100.0)
    picks = [(0, 0), (0, 11), (1, 0), (1, 2), (2, 3), (2, 19), (2, 24), (3, 5), (2, 8)]
    traj_idx, start_idx = (jnp.array(x, jnp.int32) for x in zip(*picks))
    got = jax.jit(gather_segments)(data, traj_idx, start_idx)
    obs = ds.observations.astype(np.float64)
    want = reference_get_batch(ds.to_trajectories(), picks, 6, 10, 100.0, obs.mean(0), obs.std(0) + 1e-6)
    assert got["timesteps"].dtype == jnp.int32 and got["mask"].dtype == jnp.float32
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_sampling_distribution_determinism_and_jit():
    lens = [5, 40, 15, 100, 60]
    ds = make_dataset(lens, S=2, A=1)
    starts, _ = ds.trajectory_bounds()
    obs = np.c_[np.repeat(np.arange(len(lens)), lens), np.arange(len(ds)) - np.repeat(starts, lens)]
    ds = OfflineDataset(obs, ds.actions, ds.rewards, ds.terminals, ds.timeouts)  # obs = (traj, step)
    data = segment_data(ds, context_len=8)
    sample = jax.jit(sample_batch, static_argnames="batch_size")
    key = jax.random.key(0)
    batch = sample(data, key, batch_size=20_000)
    raw = np.asarray(batch["states"]) * np.asarray(data.state_std) + np.asarray(data.state_mean)
    traj = np.rint(raw[:, -1, 0]).astype(int)  # the last position is always a real step
    counts = np.bincount(traj, minlength=len(lens))
    expected = np.array(lens) / sum(lens) * len(traj)
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    first = np.argmax(np.asarray(batch["mask"]), axis=1)
    si = np.asarray(batch["timesteps"])[np.arange(len(traj)), first]
    counts = np.bincount(si[traj == 3], minlength=100)  # start index uniform over [0, len-1]
    assert counts.shape == (100,) and stats.chisquare(counts).pvalue > 1e-3
    small = sample_batch(data, key, batch_size=64)
    for k, v in sample(data, key, batch_size=64).items():
        np.testing.assert_array_equal(v, small[k])
    other = sample(data, jax.random.key(1), batch_size=64)
    assert not np.array_equal(other["states"], small["states"])


def test_segment_data_errors():
    ds = make_dataset([3, 5])
    with pytest.raises(ValueError, match=r"every trajectory is shorter than context_len=6 .*max 5"):
        segment_data(ds, context_len=6)
    with pytest.raises(ValueError, match="context_len must be positive"):
        segment_data(ds, context_len=0)
    segment_data(ds, context_len=5)  # one long-enough trajectory suffices; short ones are kept
    with pytest.raises(ValueError, match="disagree"):
        stack_segment_data([segment_data(ds, context_len=5), segment_data(ds, context_len=4)])


def test_multitask_stacking():
    ds_a, ds_b = make_dataset([10, 20, 7], S=3, A=2, seed=2), make_dataset([15, 9], S=5, A=1, seed=3)
    data_a, data_b = segment_data(ds_a, context_len=4), segment_data(ds_b, context_len=4)
    stacked = stack_segment_data([data_a, data_b])
    assert stacked.observations.shape == (2, 37, 5) and stacked.actions.shape == (2, 37, 2)
    assert stacked.traj_lens.shape == (2, 3) and float(stacked.traj_probs[1, 2]) == 0.0
    key = jax.random.key(7)
    batch = jax.jit(sample_multitask, static_argnames="batch_per_task")(stacked, key, batch_per_task=32)
    assert batch["states"].shape == (64, 4, 5) and batch["actions"].shape == (64, 4, 2)
    assert batch["rtg"].shape == (64, 4, 1) and batch["mask"].shape == (64, 4)
    np.testing.assert_array_equal(batch["task_id"], np.repeat([0, 1], 32))
    assert not np.asarray(batch["states"][:32, :, 3:]).any()  # padded state dims are 0
    real = np.asarray(batch["mask"][32:]) > 0
    assert not np.asarray(batch["actions"][32:, :, 1])[real].any()  # padded action dims are 0 at real steps
    for t, (data, S, A) in enumerate([(data_a, 3, 2), (data_b, 5, 1)]):  # each task = its own sampler
        alone = sample_batch(data, jax.random.split(key, 2)[t], 32)
        np.testing.assert_allclose(batch["states"][32 * t:32 * (t + 1), :, :S], alone["states"], rtol=1e-6)
        np.testing.assert_array_equal(batch["actions"][32 * t:32 * (t + 1), :, :A], alone["actions"])
        for k in ("rtg", "timesteps", "mask"):
            np.testing.assert_array_equal(batch[k][32 * t:32 * (t + 1)], alone[k])
