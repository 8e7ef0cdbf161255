"""Evaluate a DT checkpoint with batched closed-loop rollouts.

    python -m launch.evaluate --config=configs/evaluate.py --config.checkpoint=runs/dt_hopper/model \
        --workdir=runs/eval_hopper

Writes `WORKDIR/eval.json` and prints a table. `tasks` defaults to the checkpoint's own task(s);
`executor` is auto (mjx on GPU/TPU, native MuJoCo C on CPU), native or mjx. `target_return`
0 means the paper's target for each task (hopper 3600, halfcheetah 12000, walker2d 5000).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint = ""
    c.tasks = ()            # empty: the checkpoint's task(s); --config.tasks=hopper,walker2d
    c.episodes = 50
    c.max_steps = 1000
    c.seed = 0
    c.executor = "auto"
    c.target_return = 0.0
    return c
