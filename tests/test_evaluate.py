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


def _window_actions(cfg, p, obs, rtg, steps, task_id=None):
    """The reference's protocol step by step: at step t, `apply(..., outputs='last')` on the
    time-ordered window of the last K steps (states, the actions predicted so far, rtg,
    timesteps clipped at max_ep_len - 1), zero-padded on the left and masked."""
    N, K = obs.shape[1], cfg.context_len
    s, a, r = [], [], []
    out = []
    for t in range(steps):
        s.append(np.pad(obs[t], ((0, 0), (0, cfg.state_dim - obs.shape[-1]))))
        a.append(np.zeros((N, cfg.act_dim), np.float32))
        r.append(rtg[t])
        L = min(t + 1, K)
        pad = lambda x: np.concatenate([np.zeros((N, K - L) + x.shape[2:], np.float32), x], 1)
        ts = np.minimum(np.arange(t + 1 - L, t + 1), cfg.max_ep_len - 1)
        act = apply(cfg, p, pad(np.stack(s[-L:], 1)), pad(np.stack(a[-L:], 1)), pad(np.stack(r[-L:], 1)[..., None]),
                    np.concatenate([np.zeros(K - L), ts])[None].repeat(N, 0).astype(np.int32),
                    np.concatenate([np.zeros(K - L), np.ones(L)])[None].repeat(N, 0).astype(np.float32),
                    task_id, outputs="last")
        a[-1] = np.asarray(act)
        out.append(a[-1])
    return np.stack(out)


@pytest.mark.parametrize("kw", [dict(), dict(timestep_embedding="before_ln"), dict(n_layer=1),
                                dict(n_head=2, activation="gelu_new", max_ep_len=6), "multi"])
def test_cached_policy_step_equals_the_full_forward_on_the_window(kw):
    """The token cache (block 0's inputs per token, a ring never reordered, the order in the mask)
    gives the action the full forward gives on the time-ordered window, step after step, past the
    ring's wrap (t >= K) and the timestep clip (max_ep_len 6), for both timestep orders, one and
    several layers and heads, and a multi-task model routed to a narrower task."""
    if kw == "multi":
        cfg = DTConfig.multi_task([("hopper", 11, 3), ("walker2d", 17, 6)], **SMALL)
        width, tid = 11, 0
    else:
        cfg, width, tid = DTConfig(state_dim=11, act_dim=3, **(SMALL | kw)), 11, None
    p = init_params(cfg, jax.random.key(1))
    r = np.random.default_rng(0)
    steps, N = 13, 4
    obs = r.normal(size=(steps, N, width)).astype(np.float32)
    rtg = r.normal(size=(steps, N)).astype(np.float32)
    step = jax.jit(lambda c, t, o, rt: ev.policy_step(cfg, p, c, t, o, rt, tid))
    cache, got = ev.TokenCache.zeros(N, cfg), []
    for t in range(steps):
        a, cache = step(cache, t, obs[t], rtg[t])
        got.append(np.asarray(a))
    np.testing.assert_allclose(np.stack(got), _window_actions(cfg, p, obs, rtg, steps, tid), atol=2e-6)


def test_cache_rows_fewer_than_the_observations_and_nan_rows_stay_local():
    """A cache of N rows fed N' > N observations writes the first N, with the actions of a cache
    of exactly N rows up to float rounding; a row whose observation is NaN poisons only itself."""
    cfg, p = hopper_model()
    r = np.random.default_rng(1)
    obs = r.normal(size=(8, 6, 11)).astype(np.float32)
    obs[3, 2] = np.nan
    rtg = r.normal(size=(8, 6)).astype(np.float32)
    step = jax.jit(lambda c, t, o, rt: ev.policy_step(cfg, p, c, t, o, rt))
    wide, narrow = ev.TokenCache.zeros(4, cfg), ev.TokenCache.zeros(4, cfg)
    for t in range(8):
        a_wide, wide = step(wide, t, obs[t], rtg[t])
        a_narrow, narrow = step(narrow, t, obs[t, :4], rtg[t, :4])
        assert a_wide.shape == (4, 3)
        np.testing.assert_allclose(a_wide, a_narrow, atol=2e-6)
        assert np.isfinite(np.delete(np.asarray(a_wide), 2, 0)).all()
        assert (t < 3) == bool(np.isfinite(a_wide[2]).all())


def test_cache_bias_is_the_causal_mask_of_the_window_in_ring_order():
    """Token (slot i, kind a) sees token (slot j, kind b) iff slot j holds a written step that is
    earlier, or the same step and b <= a: the time-ordered causal mask with left padding, read
    through the ring's slot order."""
    K = 4
    for t in range(10):
        seen = np.asarray(ev.cache_bias(t, K))[0, 0] == 0
        step = {i: t - (t - i) % K for i in range(K)}
        want = np.array([[step[j // 3] >= 0 and (step[j // 3] < step[i // 3] or (i // 3 == j // 3 and j % 3 <= i % 3))
                          for j in range(3 * K)] for i in range(3 * K)])
        np.testing.assert_array_equal(seen, want)
        assert seen[3 * (t % K) + 1].sum() == 3 * min(t, K - 1) + 2  # the query: all earlier tokens, its rtg, itself


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
