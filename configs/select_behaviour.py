"""Pick the expert and medium checkpoints of a behaviour-policy run and commit-ready copies.

    python -m launch.select_behaviour --config=configs/select_behaviour.py --config.task=hopper \
        --workdir=runs/behaviour/hopper

Evaluates every WORKDIR/policies/step_* actor on `episodes` episodes, takes the best as the
expert and the checkpoint closest to `medium_fraction` of it (within [medium_min, medium_max]) as
the medium, and saves both, with their measured returns, to `out` (default: the package's
mdt_jax/behaviour/policies/<task>/, which the collector uses).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "hopper"
    c.episodes = 20
    c.seed = 12345
    c.medium_fraction = 0.4
    c.medium_min = 0.3
    c.medium_max = 0.6
    c.out = ""
    c.overwrite = False
    return c
