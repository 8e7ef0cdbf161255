"""Behaviour policies: the actor in JAX and NumPy, the SAC update, the trainer loop with its
checkpoints and resume, and the policy checkpoint format."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import checkpoint
from mdt_jax.behaviour import policy as pol
from mdt_jax.behaviour import sac

PCFG = pol.PolicyConfig("hopper", 11, 3, (32, 32))
TINY = sac.SACConfig(hidden=(32, 32), batch_size=32, buffer_size=5_000, start_steps=200, chunk=50)


def test_numpy_actor_equals_the_jax_actor():
    params = pol.init_actor(PCFG, jax.random.key(0))
    obs = np.random.default_rng(0).standard_normal((7, 11)).astype(np.float32)
    mean, log_std = pol.actor(PCFG).apply({"params": params}, obs)
    np_mean, np_log_std = pol.numpy_forward(jax.tree.map(np.asarray, params), obs)
    np.testing.assert_allclose(np_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_log_std, log_std, rtol=1e-5, atol=1e-6)
    det = pol.numpy_policy(params, deterministic=True)(obs, None)
    np.testing.assert_allclose(det, np.tanh(mean), rtol=1e-5, atol=1e-6)
    stoch = pol.numpy_policy(params)(obs, np.random.default_rng(1))
    assert stoch.shape == (7, 3) and np.all(np.abs(stoch) <= 1) and not np.allclose(stoch, det)


def test_tanh_gaussian_log_prob_matches_the_change_of_variables():
    params = pol.init_actor(PCFG, jax.random.key(1))
    obs = jax.random.normal(jax.random.key(2), (5, 11))
    a, logp = pol.sample_action(PCFG, params, obs, jax.random.key(3))
    mean, log_std = pol.actor(PCFG).apply({"params": params}, obs)
    u = jnp.arctanh(jnp.clip(a, -1 + 1e-6, 1 - 1e-6))
    want = jnp.sum(jax.scipy.stats.norm.logpdf(u, mean, jnp.exp(log_std)) - jnp.log(1 - jnp.tanh(u) ** 2), -1)
    np.testing.assert_allclose(logp, want, rtol=1e-3, atol=1e-3)


def test_sac_updates_fit_the_critic_and_move_the_temperature():
    state = sac.init_state(PCFG, TINY, jax.random.key(0))
    r = np.random.default_rng(0)
    batch = {"obs": r.standard_normal((32, 11)), "act": r.uniform(-1, 1, (32, 3)), "rew": r.standard_normal(32),
             "next_obs": r.standard_normal((32, 11)), "term": np.ones(32)}  # terminal: y = r, a fixed target
    batch = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), batch)
    step = jax.jit(lambda s, k: sac.update(PCFG, TINY, s, batch, k))
    losses = []
    for i in range(300):
        state, m = step(state, jax.random.key(i))
        losses.append(float(m["critic_loss"]))
    assert losses[-1] < 0.1 * losses[0]
    # a fresh actor's entropy is far above -act_dim, so the temperature falls from 1
    assert float(jnp.exp(state.log_alpha)) < 0.95
    assert int(state.updates) == 300


def test_replay_buffer_wraps_around():
    buf = sac.init_buffer(PCFG, 5)
    new = lambda v, n: {"obs": jnp.full((n, 11), v), "act": jnp.zeros((n, 3)), "rew": jnp.full((n,), v),
                        "next_obs": jnp.zeros((n, 11)), "term": jnp.zeros((n,))}
    buf = sac.insert(buf, new(1.0, 3))
    buf = sac.insert(buf, new(2.0, 4))
    assert int(buf["size"]) == 5 and int(buf["ptr"]) == 2
    np.testing.assert_array_equal(buf["rew"], [2, 2, 1, 2, 2])


def _train(workdir, steps, **kw):
    return sac.train("hopper", str(workdir), env_steps=steps, cfg=TINY, seed=3, save_every=300, eval_every=300,
                     eval_episodes=2, log=lambda s: None, **kw)


def test_trainer_saves_policies_resumes_and_is_deterministic(tmp_path):
    _train(tmp_path / "a", 600)
    _train(tmp_path / "b", 300)
    assert not os.path.exists(tmp_path / "b" / "policies" / "step_00000600")
    _train(tmp_path / "b", 600)  # resumes from b/state at 300
    rows = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["env_steps"] for r in rows] == [300, 600] and all(np.isfinite(r["eval_return"]) for r in rows)
    cfg, pa, meta = pol.load_policy(tmp_path / "a" / "policies" / "step_00000600")
    assert cfg == PCFG and meta["env_steps"] == 600 and meta["updates"] == 400 and meta["seed"] == 3
    _, pb, meta_b = pol.load_policy(tmp_path / "b" / "policies" / "step_00000600")
    assert meta_b["updates"] == 400
    _train(tmp_path / "c", 600)  # same seed, same params
    _, pc, _ = pol.load_policy(tmp_path / "c" / "policies" / "step_00000600")
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pc)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="another config"):
        sac.train("hopper", str(tmp_path / "a"), env_steps=900, cfg=sac.SACConfig(hidden=(16,), start_steps=200),
                  save_every=300, eval_every=300, log=lambda s: None)


def test_policy_checkpoint_refuses_bad_files(tmp_path):
    params = jax.tree.map(np.asarray, pol.init_actor(PCFG, jax.random.key(0)))
    d = pol.save_policy(tmp_path / "p", params, PCFG, {"note": "x"})
    with pytest.raises(FileExistsError):
        pol.save_policy(d, params, PCFG)
    with pytest.raises(pol.PolicyError, match="do not fit"):
        pol.save_policy(tmp_path / "q", params, pol.PolicyConfig("hopper", 11, 3, (64, 64)))
    assert not os.path.exists(tmp_path / "q")
    bad = jax.tree.map(lambda x: x.copy(), params)
    bad["mlp"]["out"]["bias"][0] = np.nan
    with pytest.raises(pol.PolicyError, match="non-finite.*mlp/out/bias"):
        pol.save_policy(tmp_path / "r", bad, PCFG)
    shutil.copytree(d, tmp_path / "broken")
    with open(tmp_path / "broken" / pol.META_FILE, "w") as f:
        f.write("{not json")
    with pytest.raises(pol.PolicyError, match="corrupt"):
        pol.load_policy(tmp_path / "broken")
    shutil.copytree(d, tmp_path / "other")
    meta = json.load(open(d + "/" + pol.META_FILE))
    meta["config"]["hidden"] = [64, 64]
    json.dump(meta, open(tmp_path / "other" / pol.META_FILE, "w"))
    with pytest.raises(pol.PolicyError, match="do not fit"):
        pol.load_policy(tmp_path / "other")
    shutil.copytree(d, tmp_path / "trunc")
    for f in (tmp_path / "trunc" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:32])
    with pytest.raises(pol.PolicyError, match="corrupt or truncated"):
        pol.load_policy(tmp_path / "trunc")
    cfg, loaded, meta = pol.load_policy(d)
    assert meta == {"note": "x"} and cfg == PCFG
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(x, y)


def test_collect_with_the_committed_policies(tmp_path):
    """medium / expert data from the committed hopper policies: stochastic rollouts, same bytes for
    the same seed, returns far above random's, medium-expert = the two concatenated."""
    from mdt_jax.data import load_d4rl_hdf5
    from mdt_jax.run import behaviour_policy_dir, collect_dataset

    n = 3000
    paths = {q: collect_dataset("hopper", q, n, str(tmp_path / f"hopper-{q}.hdf5"), seed=0, num_envs=8)
             for q in ("random", "medium-expert")}  # medium-expert makes medium and expert beside it
    data = {q: load_d4rl_hdf5(str(tmp_path / f"hopper-{q}.hdf5"))
            for q in ("random", "medium", "expert", "medium-expert")}
    assert all(len(d.rewards) == n for q, d in data.items() if q != "medium-expert")
    assert len(data["medium-expert"].rewards) == 2 * n
    np.testing.assert_array_equal(data["medium-expert"].observations,
                                  np.concatenate([data["medium"].observations, data["expert"].observations]))
    returns = {q: data[q].metadata["return_mean"] for q in ("random", "medium", "expert")}
    assert 20 * returns["random"] < min(returns["medium"], returns["expert"]), returns
    meta = data["expert"].metadata
    assert meta["policy"] == "sac:hopper/expert" and meta["quality"] == "expert"
    _, _, pmeta = pol.load_policy(behaviour_policy_dir("hopper", "expert"))
    assert meta["policy_env_steps"] == pmeta["env_steps"]
    again = collect_dataset("hopper", "expert", n, str(tmp_path / "again.hdf5"), seed=1, num_envs=8)
    assert open(again, "rb").read() == open(tmp_path / "hopper-expert.hdf5", "rb").read()
    acts = data["expert"].actions
    assert np.all(np.abs(acts) <= 1) and len(np.unique(acts[:, 0])) > 0.9 * n  # sampled, not tanh(mean)


def test_generated_dataset_spec_is_made_once_and_cached(tmp_path, monkeypatch):
    from configs import train as train_config
    from mdt_jax.run import train_from_config

    monkeypatch.setenv("MDT_JAX_DATA", str(tmp_path / "cache"))
    c = train_config.get_config()
    c.task, c.dataset, c.num_steps, c.steps_per_call, c.checkpoint_every = "hopper", "generated:hopper-medium@2000", 2, 2, 2
    c.model.hidden_size, c.model.n_layer, c.model.context_len, c.train.batch_size = 16, 1, 5, 8
    train_from_config(c, str(tmp_path / "run"))
    made = tmp_path / "cache" / "hopper-medium-2000.hdf5"
    stamp = made.stat().st_mtime_ns
    c.seed = 1
    train_from_config(c, str(tmp_path / "run2"))
    assert made.stat().st_mtime_ns == stamp  # reused, not made again
    _, _, meta = checkpoint.load(tmp_path / "run2" / "model")
    assert meta["dataset"] == "generated:hopper-medium@2000"
    with pytest.raises(ValueError, match="legendary"):
        c.dataset = "generated:hopper-legendary"
        train_from_config(c, str(tmp_path / "run3"))


@pytest.mark.parametrize("normalize", [False, True])
def test_brax_sac_actor_converts_to_ours(normalize):
    """Brax's SAC actor (random init; with its observation normalizer folded in or not) and the
    converted one give the same distribution parameters, mode, sample and log-prob, in JAX and NumPy."""
    from brax.training.acme import running_statistics
    from brax.training.agents.sac import networks as sac_networks

    from mdt_jax.behaviour import brax_sac

    prep = running_statistics.normalize if normalize else (lambda x, y: x)
    net = sac_networks.make_sac_networks(11, 3, preprocess_observations_fn=prep, hidden_layer_sizes=(32, 24))
    params = net.policy_network.init(jax.random.key(0))
    # an output bias spreads the raw std over softplus's curved and linear parts
    params["params"]["hidden_2"]["bias"] = jnp.linspace(-3.0, 3.0, 6)
    r = np.random.default_rng(0)
    normalizer = None
    if normalize:
        normalizer = running_statistics.init_state(jax.ShapeDtypeStruct((11,), jnp.float32)).replace(
            mean=jnp.asarray(r.standard_normal(11), jnp.float32), std=jnp.asarray(r.uniform(0.2, 3.0, 11), jnp.float32))
    obs = (3 * r.standard_normal((9, 11))).astype(np.float32)
    logits = net.policy_network.apply(normalizer, params, obs)
    dist = net.parametric_action_distribution
    loc, scale = dist.create_dist(logits).loc, dist.create_dist(logits).scale

    cfg, ours = brax_sac.from_brax(params, "hopper", normalizer)
    assert cfg == pol.PolicyConfig("hopper", 11, 3, (32, 24), std="softplus")
    mean, log_std = pol.actor(cfg).apply({"params": ours}, obs)
    np_mean, np_log_std = pol.numpy_forward(ours, obs, cfg.std)
    for m, ls in ((mean, log_std), (np_mean, np_log_std)):
        np.testing.assert_allclose(m, loc, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.exp(ls), scale, rtol=1e-4, atol=1e-6)
    det, _ = pol.sample_action(cfg, ours, obs, None, deterministic=True)
    np.testing.assert_allclose(det, dist.mode(logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pol.numpy_policy(ours, True, cfg.std)(obs, None), dist.mode(logits), rtol=1e-5, atol=1e-5)
    key = jax.random.key(5)  # the same key draws the same noise in both
    a, logp = pol.sample_action(cfg, ours, obs, key)
    np.testing.assert_allclose(a, dist.sample(logits, key), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logp, dist.log_prob(logits, dist.sample_no_postprocessing(logits, key)), rtol=1e-4,
                               atol=1e-3)
    # the exp parameterization is a different distribution: the check above can fail
    assert not np.allclose(np.exp(pol.numpy_forward(ours, obs, "exp")[1]), scale, rtol=1e-2)
    with pytest.raises(ValueError, match="halfcheetah needs 17"):
        brax_sac.from_brax(params, "halfcheetah", normalizer)


def test_policy_json_without_std_loads_as_exp(tmp_path):
    params = jax.tree.map(np.asarray, pol.init_actor(PCFG, jax.random.key(0)))
    d = pol.save_policy(tmp_path / "p", params, PCFG)
    meta = json.load(open(os.path.join(d, pol.META_FILE)))
    assert meta["config"].pop("std") == "exp"  # written now; older files lack it
    json.dump(meta, open(os.path.join(d, pol.META_FILE), "w"))
    cfg, _, _ = pol.load_policy(d)
    assert cfg.std == "exp" and cfg == PCFG
    from mdt_jax.behaviour.datasets import POLICIES_DIR

    for q in ("expert", "medium"):  # the committed policies were saved before the field
        assert pol.read_policy_meta(os.path.join(POLICIES_DIR, "hopper", q))[0].std == "exp"
    with pytest.raises(ValueError, match="PolicyConfig.std"):
        pol.PolicyConfig("hopper", 11, 3, std="log")
    softplus = pol.PolicyConfig("hopper", 11, 3, (32, 32), std="softplus")
    d2 = pol.save_policy(tmp_path / "s", params, softplus)
    assert pol.load_policy(d2)[0].std == "softplus"


def test_behaviour_backend_choice():
    from mdt_jax.run import behaviour_backend

    assert behaviour_backend("native") == "native" and behaviour_backend("brax") == "brax"
    assert behaviour_backend("auto") == ("brax" if jax.default_backend() in ("gpu", "tpu") else "native")
    with pytest.raises(ValueError, match="config.backend: unknown 'mjx'"):
        behaviour_backend("mjx")


def test_collection_does_not_depend_on_the_blas_thread_count(tmp_path):
    """The NumPy actor runs with one BLAS thread whatever OPENBLAS_NUM_THREADS says: a process with
    two BLAS threads writes the same bytes as this one (the test session pins one)."""
    import subprocess
    import sys

    from mdt_jax.behaviour.datasets import collect_dataset

    here = collect_dataset("walker2d", "medium", 3000, str(tmp_path / "one.hdf5"), seed=3, num_envs=16)
    code = ("from mdt_jax.behaviour.datasets import collect_dataset; "
            f"collect_dataset('walker2d', 'medium', 3000, {str(tmp_path / 'two.hdf5')!r}, seed=3, num_envs=16)")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(here, "rb") as f, open(tmp_path / "two.hdf5", "rb") as g:
        assert f.read() == g.read()
