"""A small synthetic offline dataset with a learnable policy (tests only)."""
import numpy as np

from mdt_jax.data import OfflineDataset


def make_dataset(n_traj=12, state_dim=11, act_dim=3, seed=0, min_len=15, max_len=60) -> OfflineDataset:
    """Trajectories whose actions are a fixed nonlinear function of the state plus small noise."""
    r = np.random.default_rng(seed)
    W = r.normal(size=(state_dim, act_dim)) / np.sqrt(state_dim)
    obs, act, rew, term, tout = [], [], [], [], []
    for i in range(n_traj):
        n = int(r.integers(min_len, max_len + 1))
        s = np.cumsum(r.normal(scale=0.3, size=(n, state_dim)), axis=0)
        a = np.tanh(s @ W) + 0.01 * r.normal(size=(n, act_dim))
        obs.append(s)
        act.append(a)
        rew.append(1.0 + s[:, 0] * 0.1)
        t = np.zeros(n, bool)
        o = np.zeros(n, bool)
        (t if i % 2 else o)[-1] = True
        term.append(t)
        tout.append(o)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt)
    return OfflineDataset(observations=cat(obs, np.float32), actions=cat(act, np.float32),
                          rewards=cat(rew, np.float32), terminals=cat(term, bool), timeouts=cat(tout, bool))
