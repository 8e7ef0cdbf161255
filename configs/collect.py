"""Collect an offline dataset in the D4RL layout with batched native MuJoCo rollouts.

    python -m launch.collect --config=configs/collect.py --config.task=hopper \
        --config.quality=random --config.transitions=1000000 --workdir=data

Writes WORKDIR/<task>-<quality>.hdf5 atomically (observations, actions, rewards, terminals,
timeouts, next_observations, plus metadata). Deterministic given the seed; killed and run again,
it resumes from the last finished wave. Qualities: random (uniform actions), medium and expert
(the committed SAC behaviour policies in mdt_jax/behaviour/policies, sampled stochastically),
medium-expert (the two concatenated, as D4RL's, 2 x transitions).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "hopper"
    c.quality = "random"
    c.transitions = 1_000_000
    c.num_envs = 64
    c.slot_steps = 4000  # per env slot and wave (a wave is the unit of resumption)
    c.seed = 0
    return c
