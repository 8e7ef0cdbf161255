"""Batched evaluation: ring buffer, agreement with the sequential protocol, candidates, bad input."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import checkpoint, evaluate as ev
from mdt_jax.models import DTConfig, apply, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(hidden_size=32, n_layer=2, context_len=5, max_ep_len=1000)


def hopper_model(seed=0):
    cfg = DTConfig(state_dim=11, act_dim=3, **SMALL)
    return cfg, init_params(cfg, jax.random.key(seed))


def stats(dim=11, target=3600.0):
    return ev.TaskStats(np.zeros(dim, np.float32), np.ones(dim, np.float32), target)


def test_ring_buffer_view_matches_growing_history():
    K, S, A = 4, 2, 1
    ctx = ev.Context.zeros(1, K, S, A)
    hist = []
    for t in range(9):
        obs = jnp.full((1, S), float(t + 1))
        hist.append(t + 1)
        ctx = ctx.replace(states=ctx.states.at[:, t % K].set(obs), timesteps=ctx.timesteps.at[:, t % K].set(t))
        s, _, _, ts, m = ev.context_view(ctx, t)
        want = hist[-K:]
        L = len(want)
        np.testing.assert_array_equal(np.asarray(s)[0, :, 0], [0.0] * (K - L) + want)
        np.testing.assert_array_equal(np.asarray(m)[0], [0] * (K - L) + [1] * L)
        np.testing.assert_array_equal(np.asarray(ts)[0], [0] * (K - L) + list(range(t + 1 - L, t + 1)))


def test_ring_buffer_is_one_implementation_over_numpy_and_jax():
    """The native loop's host Context (NumPy, written in place) and the mjx path's (JAX, in jit)
    hold and view the same bits; a gather of some episodes (`rows`) is the full view's rows."""
    (M, E), K, S, A = (2, 3), 4, 5, 2
    r = np.random.default_rng(0)
    host = ev.Context.zeros((M, E), K, S, A, xp=np)
    dev = ev.Context.zeros((M, E), K, S, A)
    assert isinstance(host.states, np.ndarray) and isinstance(dev.states, jax.Array)
    write = jax.jit(ev.context_write, static_argnums=4)
    view, view_rows = jax.jit(ev.context_view), jax.jit(ev.context_view)
    for t in range(9):
        obs, rtg = r.normal(size=(M, E, S - 1)), r.normal(size=(M, E)).astype(np.float32)
        host = ev.context_write(host, t, obs, rtg, 6)  # float64 states cast on the write, as the loop does
        dev = write(dev, t, jnp.asarray(obs, jnp.float32), rtg, 6)
        cand, idx = np.arange(M)[:, None], np.stack([r.permutation(E)[:2] for _ in range(M)])
        a = r.normal(size=(M, 2, A)).astype(np.float32)
        host = ev.context_set_action(host, t, a, rows=(cand, idx))
        dev = jax.jit(ev.context_set_action)(dev, t, a, rows=(cand, idx))
        for h, d in zip(jax.tree.leaves(host), jax.tree.leaves(dev)):
            np.testing.assert_array_equal(h, d)
        full = ev.context_view(host, t)
        for h, d in zip(full, view(dev, t)):
            np.testing.assert_array_equal(h, d)
        for h, d, f in zip(ev.context_view(host, t, rows=(cand[..., None], idx[..., None])),
                           view_rows(dev, t, rows=(cand[..., None], idx[..., None])), full):
            np.testing.assert_array_equal(h, d)
            np.testing.assert_array_equal(h, f[cand, idx])
    assert host.timesteps.max() == 5  # clipped at max_ep_len - 1
    np.testing.assert_array_equal(full[-1][0, 0], np.ones(K))


def test_policy_step_equals_full_forward_on_the_window():
    cfg, p = hopper_model()
    r = np.random.default_rng(0)
    ctx = ev.Context.zeros(3, cfg.context_len, 11, 3)
    for t in range(7):
        obs, rtg = jnp.asarray(r.normal(size=(3, 11)), jnp.float32), jnp.asarray(r.normal(size=3), jnp.float32)
        a, ctx = ev.policy_step(cfg, p, ctx, t, obs, rtg)
        s, acts, rr, ts, m = ev.context_view(ctx, t)
        full = apply(cfg, p, s, acts.at[:, -1].set(0.0), rr, ts, m)[:, -1]
        np.testing.assert_allclose(a, full, atol=1e-6)
        np.testing.assert_allclose(acts[:, -1], a, atol=0)


def test_batched_equals_sequential_on_same_reset_states():
    cfg, p = hopper_model()
    st = stats()
    batched = ev.evaluate(cfg, p, ["hopper"], {"hopper": st}, episodes=3, max_steps=150, seed=1)[0]
    seq = ev.evaluate_sequential(cfg, p, "hopper", st, episodes=3, max_steps=150, seed=1)
    np.testing.assert_array_equal(batched.lengths, seq.lengths)
    np.testing.assert_allclose(batched.returns, seq.returns, rtol=1e-5)
    assert batched.lengths.min() < 150  # some episodes terminated early: masking is exercised


def test_candidates_on_a_leading_axis_and_tasks_in_one_call():
    cfg, p = hopper_model()
    p2 = init_params(cfg, jax.random.key(7))
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b, a]), p, p2)
    res = ev.evaluate(cfg, stacked, ["hopper"], {"hopper": stats()}, episodes=2, max_steps=60, seed=0)[0]
    assert res.returns.shape == (3, 2)
    np.testing.assert_allclose(res.returns[0], res.returns[2], rtol=1e-6)
    alone = ev.evaluate(cfg, p2, ["hopper"], {"hopper": stats()}, episodes=2, max_steps=60, seed=0)[0]
    np.testing.assert_allclose(res.returns[1], alone.returns[0], rtol=1e-5)
    # a multi-task model is routed to each task's own heads in one call over tasks
    mcfg = DTConfig.multi_task([("hopper", 11, 3), ("walker2d", 17, 6)], **SMALL)
    mp = init_params(mcfg, jax.random.key(0))
    both = ev.evaluate(mcfg, mp, ["hopper", "walker2d"], {"hopper": stats(11), "walker2d": stats(17, 5000.0)},
                       episodes=2, max_steps=40)
    assert [r.task for r in both] == ["hopper", "walker2d"]
    s = both[1].summary()
    assert s["return_over_target"] == pytest.approx(s["return_mean"] / 5000.0)


def test_finished_episodes_stop_accruing_and_returns_are_the_reward_sum():
    cfg, p = hopper_model()
    res = ev.evaluate(cfg, p, ["hopper"], {"hopper": stats()}, episodes=4, max_steps=1000, seed=3)[0]
    assert np.all(res.lengths < 1000) and np.all(res.lengths > 0)
    # hopper pays healthy_reward 1 per step alive, so a return cannot exceed length * (1 + speed)
    assert np.all(np.isfinite(res.returns))


def test_nan_actions_do_not_crash_and_are_reported():
    cfg, p = hopper_model()
    p = jax.tree.map(lambda x: x, p)
    p["predict_action"]["bias"] = jnp.full((3,), jnp.nan)
    with pytest.raises(ValueError):  # a checkpoint refuses NaN ...
        checkpoint.save("/nonexistent/x", p, cfg)
    res = ev.evaluate(cfg, p, ["hopper"], {"hopper": stats()}, episodes=2, max_steps=30)[0]  # ... eval reports it
    assert res.summary()["nan_action_steps"] > 0
    assert np.all(np.isfinite(res.returns))


def test_mjx_executor_matches_native():
    cfg, p = hopper_model()
    kw = dict(episodes=2, max_steps=25, seed=0)
    nat = ev.evaluate(cfg, p, ["hopper"], {"hopper": stats()}, executor="native", **kw)[0]
    mjx = ev.evaluate(cfg, p, ["hopper"], {"hopper": stats()}, executor="mjx", **kw)[0]
    np.testing.assert_array_equal(nat.lengths, mjx.lengths)
    np.testing.assert_allclose(nat.returns, mjx.returns, rtol=1e-4)


@pytest.mark.parametrize("case", ["unknown_task", "wrong_dims", "zero_episodes", "bad_params"])
def test_bad_input(case):
    cfg, p = hopper_model()
    kw = dict(episodes=2, max_steps=5)
    with pytest.raises(ValueError) as e:
        if case == "unknown_task":
            ev.evaluate(cfg, p, ["ant"], {"ant": stats()}, **kw)
        elif case == "wrong_dims":
            ev.evaluate(cfg, p, ["walker2d"], {"walker2d": stats(17)}, **kw)
        elif case == "zero_episodes":
            ev.evaluate(cfg, p, ["hopper"], {"hopper": stats()}, episodes=0)
        else:
            bad = dict(p, embed_state={"kernel": jnp.zeros((12, 32)), "bias": jnp.zeros(32)})
            ev.evaluate(cfg, bad, ["hopper"], {"hopper": stats()}, **kw)
    assert {"unknown_task": "ant", "wrong_dims": "walker2d", "zero_episodes": "episodes",
            "bad_params": "embed_state"}[case] in str(e.value)


def test_cli_writes_eval_json_and_refuses_non_dt(tmp_path):
    cfg, p = hopper_model()
    ck = tmp_path / "ck"
    checkpoint.save(ck, p, cfg, {"task": "hopper", "state_mean": [0.0] * 11, "state_std": [1.0] * 11})
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "launch.evaluate", "--config=configs/evaluate.py", f"--config.checkpoint={ck}",
           "--config.episodes=3", "--config.max_steps=50", f"--workdir={tmp_path / 'out'}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| hopper | 3 |" in r.stdout
    out = json.loads((tmp_path / "out" / "eval.json").read_text())
    row = out["results"][0]
    assert row["task"] == "hopper" and row["episodes"] == 3
    assert row["return_over_target"] == pytest.approx(row["return_mean"] / 3600.0)
    # a non-DT folder: launch.evaluate's entry refuses it (a ValueError: the CLI's exit 2,
    # tests/test_bad_inputs.py), nothing written
    from cliargs import config_from_args
    from mdt_jax.run import evaluate_from_config

    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="not an mdt_jax DT checkpoint"):
        evaluate_from_config(config_from_args(cmd[:4] + [f"--config.checkpoint={tmp_path / 'junk'}"]),
                             str(tmp_path / "o2"))
    assert not (tmp_path / "o2" / "eval.json").exists()


def test_same_seed_same_returns_other_seed_differs():
    cfg, p = hopper_model()
    run = lambda seed: ev.evaluate(cfg, p, ["hopper"], {"hopper": stats()}, episodes=3, max_steps=60, seed=seed)[0]
    a, b, c = run(4), run(4), run(5)
    np.testing.assert_array_equal(a.returns, b.returns)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    assert not np.array_equal(a.returns, c.returns)


def test_candidates_on_their_own_seeds_in_one_call_equal_each_alone_bitwise():
    """Several seeds' candidates in one call (seed per candidate): each candidate's returns and
    lengths are bitwise those it gets alone on its seed, whatever it is stacked with (a stack of
    one included), so batching across seeds changes no result."""
    cfg, p = hopper_model()
    p2 = init_params(cfg, jax.random.key(7))
    st = {"hopper": stats()}
    stack = lambda *ps: jax.tree.map(lambda *x: jnp.stack(x), *ps)
    res = ev.evaluate(cfg, stack(p, p2, p), ["hopper"], st, episodes=4, max_steps=150, seed=[3, 1, 2])[0]
    assert len(set(res.lengths.ravel().tolist())) > 2  # episodes end at different steps: buckets shrink
    for m, (q, s) in enumerate([(p, 3), (p2, 1), (p, 2)]):
        alone = ev.evaluate(cfg, q, ["hopper"], st, episodes=4, max_steps=150, seed=s)[0]
        np.testing.assert_array_equal(res.returns[m], alone.returns[0])
        np.testing.assert_array_equal(res.lengths[m], alone.lengths[0])
    pair = ev.evaluate(cfg, stack(p2, p), ["hopper"], st, episodes=4, max_steps=150, seed=[5, 2])[0]
    np.testing.assert_array_equal(pair.returns[1], res.returns[2])
    for bad in ([1, 2], [1, -1, 2], "0", [0.5, 1, 2], True):
        with pytest.raises(ValueError, match="seed"):
            ev.evaluate(cfg, stack(p, p2, p), ["hopper"], st, episodes=2, max_steps=5, seed=bad)


def test_run_lockstep_groups_compatible_requests_and_returns_each_stages_value(tmp_path):
    cfg, p = hopper_model()
    meta = {"task": "hopper", "stats": {"hopper": {"state_mean": [0.0] * 11, "state_std": [1.0] * 11}}}
    model = checkpoint.load(checkpoint.save(tmp_path / "m", p, cfg, meta))
    spec = ev.EvalSpec(episodes=2, max_steps=20, own_task=True)

    def stage(seed, n):
        got = []
        for k in range(n):
            rows = yield ev.EvalRequest(model, p, spec, seed, f"s{seed}_{k}")
            got.append(rows[0].summary["return_mean"])
        return got

    done = []
    out = ev.run_lockstep([stage(0, 2), stage(1, 1), stage(0, 0)], on_done=lambda i, v: done.append(i))
    alone = ev.evaluate_model(model, p, spec, seed=1, label="x")[0].summary["return_mean"]
    assert out[1] == [alone] and out[0][0] == out[0][1] and out[2] == [] and sorted(done) == [0, 1, 2]
    with pytest.raises(TypeError, match="EvalRequest"):
        ev.run_lockstep([(x for x in [1])])
