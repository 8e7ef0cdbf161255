"""Env executors against the real Gymnasium v5 envs (MuJoCo C), no mocks.

Reference trajectories: Gymnasium reset with seed 1, then 300 steps of a joint PD controller plus
Gaussian noise (`POLICY`), replayed open-loop on our executors. The comparison runs all 300 steps,
through walker2d's termination (Gymnasium keeps stepping after it).
"""
import dataclasses
import functools

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdt_jax import envs
from mdt_jax.envs.mjx import MjxEnv

GYM_IDS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}
STEPS, SEED = 300, 1
# Joint PD gains and noise of the reference policy: the PD keeps hopper and walker2d up (hopper
# for all 300 steps, walker2d until step 177); halfcheetah never falls and gets noise alone.
POLICY = {"hopper": (2.0, 0.05, 0.1), "walker2d": (2.0, 0.05, 0.1), "halfcheetah": (0.0, 0.0, 0.2)}


@functools.lru_cache(maxsize=None)
def gym_rollout(name):
    """Gymnasium's trajectory: initial qpos/qvel, reset obs, then actions, obs, rewards, flags."""
    env = gym.make(GYM_IDS[name])
    obs0, _ = env.reset(seed=SEED)
    data, rng = env.unwrapped.data, np.random.default_rng(SEED)
    qpos, qvel = data.qpos.copy(), data.qvel.copy()
    kp, kd, noise = POLICY[name]
    steps = []
    for _ in range(STEPS):
        action = -kp * data.qpos[3:] - kd * data.qvel[3:]  # qpos[3:] are the actuated joints
        action += noise * rng.standard_normal(action.shape)
        steps.append((action, *env.step(action)[:4]))
    actions, obs, reward, terminated, truncated = map(np.array, zip(*steps))
    return dict(qpos=qpos, qvel=qvel, obs0=obs0, actions=actions, obs=obs, reward=reward,
                terminated=terminated, truncated=truncated)


@pytest.mark.parametrize("name", GYM_IDS)
def test_native_matches_gymnasium(name):
    """Native is bit-identical to Gymnasium in practice (same C calls); asserted at rtol 1e-6 with
    atol 1e-9 for entries near 0, where a relative bound means nothing."""
    ref = gym_rollout(name)
    env = envs.NativeBatchEnv(name, 1, nthread=1)
    np.testing.assert_allclose(env.set_state(ref["qpos"][None], ref["qvel"][None])[0], ref["obs0"],
                               rtol=1e-6, atol=1e-9)
    for t in range(STEPS):
        obs, reward, terminated, truncated, info = env.step(ref["actions"][t][None])
        np.testing.assert_allclose(obs[0], ref["obs"][t], rtol=1e-6, atol=1e-9, err_msg=f"step {t}")
        np.testing.assert_allclose(reward[0], ref["reward"][t], rtol=1e-6, atol=1e-9)
        assert (terminated[0], truncated[0]) == (ref["terminated"][t], ref["truncated"][t]), t
        assert not info["nan_action"][0]
    assert ref["terminated"].any() == (name == "walker2d")  # only walker2d falls in the reference


@functools.lru_cache(maxsize=None)
def mjx_rollout(name):
    """MJX over the reference actions for 2 envs in one jitted scan: env 0 replays Gymnasium's
    actions, env 1 the same with non-finite entries at steps 5 (NaN) and 6 (inf). The episode
    limit is set to STEPS so that truncation shows at the last step."""
    ref = gym_rollout(name)
    env = MjxEnv(dataclasses.replace(envs.get_task(name), max_episode_steps=STEPS))
    actions = np.stack([ref["actions"]] * 2, axis=1)  # (T, 2, act_dim)
    actions[5, 1, 0], actions[6, 1, -1] = np.nan, np.inf

    @jax.jit
    def run(qpos, qvel, actions):
        state = jax.vmap(env.init_state)(qpos, qvel)
        def step(state, action):
            state = jax.vmap(env.step)(state, action)
            return state, (state.obs, state.reward, state.done, state.info)
        return jax.lax.scan(step, state, actions)[1]

    tile = lambda x: jnp.asarray(np.stack([x, x]))
    return jax.device_get(run(tile(ref["qpos"]), tile(ref["qvel"]), jnp.asarray(actions)))


# Measured max |MJX(float32) - Gymnasium(float64)| over the 300 steps, obs / reward:
#   hopper 1.4e-4 / 1.4e-4, walker2d 8.5e-4 / 9.0e-5 (1.9e-4 / 3.1e-5 until it falls at step 177),
#   halfcheetah 2.0e-4 / 9.7e-6; over the first 10 steps at most 2.5e-5.
# Errors start at float32 round-off and grow with the contact dynamics. With jax_enable_x64 the
# same comparison gives 5e-14 (hopper), 2e-13 (halfcheetah) and 3e-7 (walker2d), so the gap is
# precision. Harsher action sequences (e.g. a saturating, bang-bang PD) are chaotic enough that
# even float64 MJX and C part after ~50 steps, which is why the reference policy is gentle.
MJX_ATOL = {"obs": 5e-3, "reward": 1e-3, "obs_first_10": 1e-4}


@pytest.mark.parametrize("name", GYM_IDS)
def test_mjx_matches_gymnasium(name):
    ref = gym_rollout(name)
    obs, reward, done, info = mjx_rollout(name)
    np.testing.assert_allclose(obs[:, 0], ref["obs"], atol=MJX_ATOL["obs"])
    np.testing.assert_allclose(reward[:, 0], ref["reward"], atol=MJX_ATOL["reward"])
    np.testing.assert_allclose(obs[:10, 0], ref["obs"][:10], atol=MJX_ATOL["obs_first_10"])
    terminated = done[:-1, 0] > 0
    first = lambda flags: np.argmax(flags) if flags.any() else None
    assert first(terminated) == first(ref["terminated"][:-1])
    np.testing.assert_array_equal(info["truncation"][:, 0], np.arange(1, STEPS + 1) == STEPS)
    np.testing.assert_array_equal(info["steps"][-1], [STEPS, STEPS])


def test_mjx_nan_actions_are_zeroed_and_reported():
    obs, reward, _, info = mjx_rollout("hopper")
    expected = np.zeros((STEPS, 2), bool)
    expected[[5, 6], 1] = True
    np.testing.assert_array_equal(info["nan_action"], expected)
    assert np.isfinite(obs).all() and np.isfinite(reward).all()
    np.testing.assert_array_equal(obs[:5, 1], obs[:5, 0])
    assert not np.array_equal(obs[5:, 1], obs[5:, 0])


def test_native_ctrl_clamping_matches_gymnasium():
    """Actions beyond ctrlrange reach MuJoCo unclipped (it clamps ctrl); the cost is on the action."""
    genv = gym.make("Hopper-v5")
    genv.reset(seed=0)
    env = envs.NativeBatchEnv("hopper", 2, nthread=1)
    env.set_state(np.tile(genv.unwrapped.data.qpos, (2, 1)), np.tile(genv.unwrapped.data.qvel, (2, 1)))
    for action in np.random.default_rng(0).uniform(-3, 3, (20, 3)):
        obs, reward, terminated, _, _ = env.step(np.stack([action, np.clip(action, -1, 1)]))
        g_obs, g_reward, g_terminated = genv.step(action)[:3]
        np.testing.assert_allclose(obs, [g_obs, g_obs], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(reward[0], g_reward, rtol=1e-6, atol=1e-9)
        assert terminated[0] == g_terminated
    assert reward[0] < reward[1]


def test_native_nan_actions_are_zeroed_and_reported():
    env = envs.NativeBatchEnv("hopper", 3, nthread=1)
    env.reset(0)
    zero = envs.NativeBatchEnv("hopper", 3, nthread=1)
    zero.reset(0)
    bad = np.zeros((3, 3))
    bad[1, 0], bad[2] = np.nan, [np.inf, -np.inf, np.nan]
    for _ in range(20):
        obs, reward, _, _, info = env.step(bad)
        ref = zero.step(np.zeros((3, 3)))
        np.testing.assert_array_equal(info["nan_action"], [False, True, True])
        np.testing.assert_array_equal(obs, ref[0])  # non-finite entries act as 0
        np.testing.assert_array_equal(reward, ref[1])
    assert np.isfinite(obs).all()


@pytest.mark.parametrize("name", GYM_IDS)
def test_reset_noise(name):
    task = envs.get_task(name)
    # One env and an int seed reproduce Gymnasium's reset exactly.
    np.testing.assert_array_equal(envs.NativeBatchEnv(name, 1).reset(SEED)[0], gym_rollout(name)["obs0"])
    # Distribution: qpos0 + U(-s, s); qvel U(-s, s), or s * N(0, 1) for halfcheetah.
    model, s, n = task.load_model(), task.reset_noise_scale, 4000
    env = envs.NativeBatchEnv(name, n)
    env.reset(0)
    mjx_env = MjxEnv(task)  # its reset is init_state(*sample_initial(rng)), tested in the rollout
    mjx_qpos, mjx_qvel = jax.vmap(mjx_env.sample_initial)(jax.random.split(jax.random.key(0), n))
    for qpos, qvel in [env.state(), (mjx_qpos, mjx_qvel)]:
        dpos, qvel = np.asarray(qpos, np.float64) - model.qpos0, np.asarray(qvel, np.float64)
        assert s * 0.99 < np.abs(dpos).max() <= s
        np.testing.assert_allclose(dpos.mean(0), 0, atol=0.1 * s)
        np.testing.assert_allclose(dpos.std(0), s / np.sqrt(3), rtol=0.1)
        if task.qvel_noise == "normal":
            np.testing.assert_allclose(qvel.std(0), s, rtol=0.1)
            assert np.abs(qvel).max() > 3 * s
        else:
            assert np.abs(qvel).max() <= s
            np.testing.assert_allclose(qvel.std(0), s / np.sqrt(3), rtol=0.1)


def test_native_time_limit_truncates_at_1000():
    env = envs.make("halfcheetah", "native", num_envs=2, nthread=1)
    env.reset(0)
    for t in range(1, 1001):
        _, _, terminated, truncated, _ = env.step(np.zeros((2, 6)))
        assert not terminated.any()
        np.testing.assert_array_equal(truncated, [t == 1000] * 2)
    env.reset(1)
    assert not env.step(np.zeros((2, 6)))[3].any()


def test_native_is_deterministic_given_the_seed():
    def run(seed, nthread):
        env = envs.NativeBatchEnv("walker2d", 8, nthread=nthread)
        out = [env.reset(seed)]
        actions = np.random.default_rng(seed).uniform(-1, 1, (50, 8, 6))
        out += [env.step(a)[0] for a in actions]
        return np.stack(out)

    a = run(3, 1)
    np.testing.assert_array_equal(a, run(3, 2))  # also thread-count independent
    assert not np.allclose(a, run(4, 1))


def test_healthy_rule_matches_gymnasium():
    rng = np.random.default_rng(0)
    for name in ("hopper", "walker2d"):
        task, env = envs.get_task(name), gym.make(GYM_IDS[name]).unwrapped
        n, z_bounds = 400, [b for b in task.healthy_z_range if np.isfinite(b)]
        qpos = np.tile(env.init_qpos, (n, 1)) + rng.uniform(-0.05, 0.05, (n, env.model.nq))
        qpos[:, 1] = rng.choice(z_bounds, n) + rng.uniform(-0.1, 0.1, n)  # straddle each bound
        qpos[:, 2] = rng.choice(task.healthy_angle_range, n) + rng.uniform(-0.1, 0.1, n)
        qvel = rng.uniform(-1, 1, (n, env.model.nv)) * rng.choice([1, 120], (n, 1))  # hopper's 100
        expected = []
        for q, v in zip(qpos, qvel):
            env.set_state(q, v)
            expected.append(env.is_healthy)
        np.testing.assert_array_equal(envs.is_healthy(task, qpos, qvel), expected)
        assert 0.05 < np.mean(expected) < 0.5


def test_registry_and_scores():
    with pytest.raises(ValueError, match="halfcheetah.*hopper.*walker2d"):
        envs.get_task("ant")
    with pytest.raises(ValueError, match="Unknown task"):
        envs.make("ant")
    with pytest.raises(ValueError, match="Unknown executor"):
        envs.make("hopper", executor="torch")
    assert isinstance(envs.make("hopper", num_envs=2), envs.NativeBatchEnv)  # 'auto' on CPU
    mjx_env = envs.make("hopper", "mjx", num_envs=2)
    shapes = jax.eval_shape(mjx_env.reset, jax.random.key(0))
    assert shapes.obs.shape == (2, 11) and shapes.info["nan_action"].dtype == bool
    for name, task in envs.TASKS.items():
        assert envs.normalized_score(name, task.random_score) == 0
        np.testing.assert_allclose(envs.normalized_score(task, np.array([task.expert_score])), [100])
    assert [envs.target_return(n) for n in ("hopper", "halfcheetah", "walker2d")] == [3600, 12000, 5000]
    model = envs.get_task("walker2d").load_model()
    assert model.geom("foot_geom").friction[0] == 1.9  # the v5 MJCF, not walker2d.xml


# --- envs.run_episodes: the one rollout loop -------------------------------------------------

def _starts(name, n, seed=0):
    env = envs.NativeBatchEnv(name, n, nthread=1)
    env.reset(seed)
    return env.state()


def test_run_episodes_batch_equals_one_slot_runs_and_masks_finished_slots():
    """N episodes stepped together give each episode what it gets alone on a one-slot env (an
    elementwise policy, so no batch-size-dependent BLAS rounding), bit for bit; the recorded steps
    are consistent with the bookkeeping."""
    policy = lambda obs, rng: np.tanh(3.0 * obs[:, 2:5])
    qpos, qvel = _starts("hopper", 5)
    out = envs.run_episodes(envs.NativeBatchEnv("hopper", 5, nthread=1), policy, rng=np.random.default_rng(0),
                            starts=(qpos, qvel), max_steps=150, record=True)
    one = envs.NativeBatchEnv("hopper", 1, nthread=1)
    alone = [envs.run_episodes(one, policy, rng=np.random.default_rng(0), starts=(qpos[e:e + 1], qvel[e:e + 1]),
                               max_steps=150) for e in range(5)]
    for f in ("returns", "lengths", "nan_actions"):
        np.testing.assert_array_equal(getattr(out, f), [getattr(a, f)[0] for a in alone])
    assert out.lengths.min() < out.lengths.max() <= 150  # episodes end at different steps: masking is exercised
    live, s = out.steps["live"], out.steps
    assert live.shape == (5, out.lengths.max())
    np.testing.assert_array_equal(live.sum(1), out.lengths)
    np.testing.assert_array_equal(live, np.arange(live.shape[1])[None] < out.lengths[:, None])  # a live prefix
    np.testing.assert_array_equal(np.cumsum(np.where(live, s["rewards"], 0.0), 1)[:, -1], out.returns)  # in step order
    ended = out.lengths < 150
    last = s["terminals"][np.arange(5), out.lengths - 1] | s["timeouts"][np.arange(5), out.lengths - 1]
    np.testing.assert_array_equal(last[ended], True)
    eps = out.episodes()
    assert [len(e["rewards"]) for e in eps] == out.lengths.tolist()


class _Recorder:
    """An EpisodePolicy that acts with zeros on live slots and NaN on finished ones, and records
    what the loop gives it."""

    def __init__(self, act_dim):
        self.act_dim = act_dim

    def reset(self, n):
        self.n, self.calls, self.rewards = n, [], []

    def __call__(self, obs, t, live):
        self.calls.append((t, live.copy()))
        return np.where(live[:, None], 0.0, np.nan) * np.ones((obs.shape[0], self.act_dim))

    def observe(self, reward):
        self.rewards.append(reward)


def test_run_episodes_episode_policy_protocol_and_the_max_steps_cut():
    pol, seen = _Recorder(6), []
    out = envs.run_episodes(envs.NativeBatchEnv("halfcheetah", 3, nthread=1), pol, starts=_starts("halfcheetah", 3),
                            max_steps=40, record=True, progress=seen.append)
    assert pol.n == 3 and [t for t, _ in pol.calls] == list(range(40))  # halfcheetah never terminates: cut at 40
    np.testing.assert_array_equal(out.lengths, 40)
    np.testing.assert_array_equal(np.stack(pol.rewards, 1), out.steps["rewards"])
    np.testing.assert_array_equal(out.returns, np.sum(pol.rewards, 0))
    assert seen == [3] * 40 and not out.nan_actions.any()
    assert [len(e["rewards"]) for e in out.episodes()] == [40] * 3  # cut episodes are kept, unfinished
    # hopper: slots that fell are stepped with NaN actions while the others go on, never counted
    pol, seen = _Recorder(3), []
    hop = envs.run_episodes(envs.NativeBatchEnv("hopper", 4, nthread=1), pol, starts=_starts("hopper", 4, seed=2),
                            max_steps=1000, progress=seen.append)
    assert hop.lengths.min() < hop.lengths.max() < 1000 and not hop.nan_actions.any()
    assert seen == [int(live.sum()) for _, live in pol.calls] and len(seen) == hop.lengths.max()
    np.testing.assert_array_equal(sum(live for _, live in pol.calls), hop.lengths)


def test_run_episodes_auto_reset_runs_slots_until_slot_steps():
    n, slot_steps = 3, 60
    out = envs.run_episodes(envs.NativeBatchEnv("hopper", n, nthread=1),
                            lambda obs, rng: rng.uniform(-1, 1, (obs.shape[0], 3)), rng=np.random.default_rng(1),
                            slot_steps=slot_steps, record=True)
    eps = out.episodes()
    assert len(eps) > n  # falling random hoppers: several episodes per slot
    per_slot, i = [], 0
    for slot in range(n):
        total = 0
        while total < out.lengths[slot]:
            ep = eps[i]
            assert ep["terminals"][-1] or ep["timeouts"][-1]
            assert not (ep["terminals"][:-1] | ep["timeouts"][:-1]).any()
            np.testing.assert_array_equal(ep["observations"][1:], ep["next_observations"][:-1])
            total, i = total + len(ep["rewards"]), i + 1
        per_slot.append(total)
        # the slot stopped with the first episode that took it to slot_steps
        assert total >= slot_steps and total - len(eps[i - 1]["rewards"]) < slot_steps
    assert i == len(eps) and per_slot == out.lengths.tolist()
    np.testing.assert_allclose(sum(e["rewards"].sum() for e in eps), out.returns.sum(), rtol=1e-12)


@pytest.mark.parametrize("case", ["max_steps", "slot_steps", "stateful_auto_reset", "no_rng", "starts", "episodes"])
def test_run_episodes_bad_input(case):
    env = envs.NativeBatchEnv("hopper", 2, nthread=1)
    plain, rng = (lambda obs, rng: np.zeros((2, 3))), np.random.default_rng(0)
    with pytest.raises(ValueError, match={"max_steps": "max_steps", "slot_steps": "slot_steps",
                                          "stateful_auto_reset": "slot_steps", "no_rng": "rng",
                                          "starts": "starts", "episodes": "record"}[case]):
        if case == "max_steps":
            envs.run_episodes(env, plain, rng=rng, max_steps=0)
        elif case == "slot_steps":
            envs.run_episodes(env, plain, rng=rng, slot_steps=True)
        elif case == "stateful_auto_reset":
            envs.run_episodes(env, _Recorder(3), rng=rng, slot_steps=10)
        elif case == "no_rng":
            envs.run_episodes(env, plain, starts=_starts("hopper", 2))
        elif case == "starts":
            envs.run_episodes(env, plain, rng=rng, starts=_starts("hopper", 3))
        else:
            envs.run_episodes(env, plain, rng=rng, max_steps=3).episodes()
