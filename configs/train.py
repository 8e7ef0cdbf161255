"""Train one single-task Decision Transformer on an offline dataset.

    python -m launch.train --config=configs/train.py --config.task=hopper \
        --config.dataset=PATH.hdf5 --workdir=runs/dt_hopper

`--config.dataset` takes a D4RL-layout HDF5 (.hdf5/.h5), a reference trajectory pickle (.pkl), or
`minari:<dataset id>` (looked up under MINARI_DATASETS_PATH). Every field can be overridden with
`--config.<field>=<value>`; an unknown field or a value of the wrong type is an error.
Defaults are the reference's single-task settings (H128 L3 1 head K20, AdamW 1e-4, batch 64).
"""
import ml_collections


# The fields a config exposes; their defaults are the dataclasses' (defined once, in mdt_jax).
MODEL_FIELDS = ("hidden_size", "n_layer", "n_head", "context_len", "max_ep_len", "dropout", "activation",
                "action_tanh", "timestep_embedding", "init_scheme")
TRAIN_FIELDS = ("batch_size", "learning_rate", "weight_decay", "warmup_steps", "grad_clip", "adam_eps", "init_reg",
                "init_reg_on", "freeze", "no_decay")


def _cli(v):
    # path-pattern tuples are comma-separated strings on the command line (--config.train.freeze=a,b)
    return ",".join(v) if isinstance(v, tuple) else v


def model_config() -> ml_collections.ConfigDict:
    from mdt_jax.models.dt import DTConfig

    d = DTConfig()
    return ml_collections.ConfigDict({f: getattr(d, f) for f in MODEL_FIELDS})


def train_config() -> ml_collections.ConfigDict:
    from mdt_jax.train import TrainConfig

    d = TrainConfig()
    return ml_collections.ConfigDict({f: _cli(getattr(d, f)) for f in TRAIN_FIELDS})


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # task and dataset are comma-separated strings, paired by position (several: one multi-task DT,
    # --config.task=hopper,walker2d --config.dataset=a.hdf5,b.hdf5), not tuples: ml_collections
    # reads a tuple override as a Python literal (`a.hdf5,minari:x/y` is none) and appends a
    # repeated tuple flag where a repeated --config.task must replace the earlier one
    c.task = "hopper"
    c.dataset = ""
    c.seed = 0
    c.num_steps = 100_000
    c.steps_per_call = 100
    c.checkpoint_every = 5_000
    c.log_every = 100
    c.rtg_scale = 1000.0
    c.mesh_devices = 0  # data-parallel devices: 0 = as many as divide the batch (all, across hosts), 1 = one
    c.init_from = ""  # a DT checkpoint whose params start training (e.g. a P1 merge to finetune)
    # the seed of the parameter init (-1: from `seed`). Models that share it share the init of every
    # same-shaped param (the trunk blocks, ln_f, the timestep embedding), whatever their task: the
    # paper's "common init", while `seed` still sets each run's data order and dropout.
    c.init_seed = -1
    # a DT checkpoint whose trunk (blocks and ln_f) starts this model, the rest from the init seed:
    # a pretrained common init (launch.reproduce's `pretrained` set)
    c.init_trunk_from = ""
    # the reference's --save_mode: "last" (the final params, model/), "best" (model_best/: the params
    # of the evaluation every `eval_every` steps with the best mean normalised score on
    # `select_episodes` selection episodes, reset seed `select_seed`, which must differ from the
    # seeds the results are reported on), or "both"
    c.save_mode = "last"
    c.eval_every = 0
    c.select_episodes = 0
    c.select_seed = 1000
    # the paper's language initialisation (mdt_jax/lm.py): a transformers save_pretrained GPT-2 LM
    # folder whose trunk (blocks, ln_f) starts the DT; config.model must match its size
    c.init_from_lm = ""
    c.lm_timestep_from_wpe = True  # the reference's --extend_positions: embed_timestep starts from the LM's wpe
    c.lm_kmeans = 0  # k-means clusters of the LM's wte for the annealed cosine loss (reference: 1000; 0 = off)
    c.lm_kmeans_const = 0.1  # its weight before annealing (reference --gpt_kmeans_const)
    c.lm_tokens = ""  # a .npy of token ids to co-train on language modelling ("" = off)
    c.lm_cotrain_weight = 1.0  # weight of the LM loss (reference --gpt_lm_const)
    c.lm_batch_size = 2  # token sequences per step (reference: 2)
    c.lm_seq_len = 1024  # tokens per sequence (reference block_size: 1024)
    c.model = model_config()
    c.train = train_config()
    return c
