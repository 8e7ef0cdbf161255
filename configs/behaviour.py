"""Train a behaviour policy (SAC on the native executor) whose checkpoints make the datasets.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    python -m launch.train_behaviour --config=configs/behaviour.py --config.task=hopper \
        --config.stop_return=3300 --workdir=runs/behaviour/hopper

Saves the actor every `save_every` env steps to WORKDIR/policies/step_XXXXXXXX (orbax + JSON,
with its evaluation return), and the whole trainer state (replay buffer included) to
WORKDIR/state; the same command run again resumes. `python -m launch.select_behaviour` then
picks the expert and medium checkpoints. One SAC update (256x256, batch 256) costs about 3.7 ms on
one core of this CPU, so 1M env steps at utd 1 take about an hour; the XLA flag keeps each run on
one core, so that two tasks train side by side.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "hopper"
    c.env_steps = 1_000_000
    c.seed = 0
    c.save_every = 25_000
    c.eval_every = 5_000
    c.eval_episodes = 10
    c.stop_return = 0.0  # > 0: stop once an evaluation's mean return reaches it
    c.sac = ml_collections.ConfigDict()
    c.sac.hidden = (256, 256)
    c.sac.lr = 3e-4
    c.sac.gamma = 0.99
    c.sac.tau = 0.005
    c.sac.batch_size = 256
    c.sac.buffer_size = 1_000_000
    c.sac.start_steps = 10_000
    c.sac.utd = 1.0
    c.sac.num_envs = 1
    c.sac.chunk = 50
    c.sac.init_alpha = 1.0
    return c
