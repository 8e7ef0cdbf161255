"""The quickstart: the whole pipeline on generated data, in a few minutes on a 2-core CPU.

    python -m launch.reproduce --config=configs/quickstart.py --workdir=runs/quickstart

For each task it collects a uniform-random-policy dataset with the native MuJoCo executor
(cached), trains a small single-task DT on it (resumable), evaluates the DT with batched
closed-loop rollouts, and writes results.json and results.md. Random-policy data is what a fresh
machine can make without trained behaviour policies; expect DT returns near the data's.
"""
import ml_collections

from configs import train as train_cfg


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tasks = "hopper,halfcheetah,walker2d"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(quality="random", transitions=20_000, num_envs=64))
    t = train_cfg.get_config()
    t.num_steps = 600
    t.steps_per_call = 100
    t.checkpoint_every = 300
    t.log_every = 100
    t.model.hidden_size = 64
    t.model.n_layer = 2
    t.train.batch_size = 32
    t.train.learning_rate = 1e-3
    t.train.warmup_steps = 100
    c.train = t
    c.eval = ml_collections.ConfigDict(dict(episodes=10, max_steps=1000, executor="auto"))
    return c
