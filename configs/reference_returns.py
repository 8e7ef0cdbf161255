"""Measure Gymnasium-v5 reference returns: a uniform-random policy and the committed experts.

    python -m launch.reference_returns --workdir=runs/reference_returns --config.episodes=100

Writes WORKDIR/reference_returns.json: per task the mean, std, episodes and seed of the returns
of the random policy and of the committed expert behaviour policy (deterministic actions; the
stochastic ones for information), from the evaluator's episode starts for `seed`. The committed
copy is mdt_jax/envs/v5_reference.json, which `envs.tasks.v5_normalized_score` reads.
`tasks` empty: every task.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tasks = ()              # empty: every task; --config.tasks=hopper,walker2d
    c.episodes = 100
    c.seed = 0
    c.max_steps = 1000
    c.overwrite = False
    return c
