"""Train a behaviour policy (SAC) whose checkpoints make the datasets.

    XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
    python -m launch.train_behaviour --config=configs/behaviour.py --config.task=hopper \
        --config.stop_return=3300 --workdir=runs/behaviour/hopper

Saves the actor every `save_every` env steps to WORKDIR/policies/step_XXXXXXXX (orbax + JSON,
with its evaluation return), and the whole trainer state (replay buffer included) to
WORKDIR/state; the same command run again resumes. `python -m launch.select_behaviour` then
picks the expert and medium checkpoints. One SAC update (256x256, batch 256) costs about 3.7 ms on
one core of this CPU, so 1M env steps at utd 1 take about an hour; the XLA flag keeps each run on
one core, so that two tasks train side by side.

`backend` picks the trainer: "native" (mdt_jax.behaviour.sac: MuJoCo C envs stepped from Python,
settings in `sac`, resumable), "brax" (mdt_jax.behaviour.brax_sac: Brax's SAC on the MJX executor,
everything on the accelerator, settings in `brax`, not resumable; `eval_every` and `stop_return`
do not apply, evaluations fall on the saves), or "auto" (brax when JAX's default backend is a GPU
or TPU, else native). Both write the same policy checkpoints.
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
    c.backend = "native"  # "native" | "brax" | "auto"
    c.brax = ml_collections.ConfigDict()  # mdt_jax.behaviour.brax_sac.BraxSACConfig
    c.brax.hidden = (256, 256)
    c.brax.lr = 3e-4
    c.brax.gamma = 0.99
    c.brax.tau = 0.005
    c.brax.batch_size = 256
    c.brax.buffer_size = 1_000_000
    c.brax.start_steps = 10_000
    c.brax.num_envs = 128
    c.brax.grad_updates_per_step = 32
    c.brax.reward_scaling = 1.0
    c.brax.normalize_observations = True
    c.brax.episode_length = 1000
    c.brax.num_eval_envs = 16
    c.brax.iterations = ml_collections.config_dict.placeholder(int)  # None: the MJCF's solver iterations
    c.brax.ls_iterations = ml_collections.config_dict.placeholder(int)
    return c
