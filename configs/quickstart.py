"""The quickstart: the paper's whole study at toy scale, in about 8 minutes on an idle 2-core CPU.

    python -m launch.reproduce --config=configs/quickstart.py --workdir=runs/quickstart

Collects a dataset per task (quality `data.quality`, default "medium": the committed SAC
behaviour policies, sampled, with the native MuJoCo executor; "random" needs no policy), trains
small single-task DTs from independent inits, from a shared random init, from a pretrained trunk
(`pretrain`: random-policy data the targets never see) and at a larger size, a multi-task DT and its per-task finetunes; computes Fishers; runs P1
(average / Fisher, attn+mlp and all block params), P2 and the P3 grids; evaluates every model
with batched rollouts next to a uniform-random policy; writes WORKDIR/results.json (rows and the
claims C1..C6 decided from the numbers with rliable CIs; P3 bests chosen on held-out selection
episodes), results.md and results_*.png. Every stage is cached, so
the same command run again only rewrites the results. Two seeds, small models and 500 training
steps: expect several claims to come out `null` (within noise) at this scale;
`configs/paper.py:cpu` is the trustworthy run.
"""
import ml_collections

from configs import fisher as fisher_cfg
from configs import merge as merge_cfg
from configs import train as train_cfg


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.tasks = ("hopper", "halfcheetah", "walker2d")
    c.seeds = (0, 1)              # every stage runs per seed, rows are pooled (--config.seeds=0,1,2)
    c.compile_cache = True        # XLA's persistent cache in WORKDIR/jax_cache (unless one is set already)
    c.data = ml_collections.ConfigDict(dict(quality="medium", transitions=50_000, num_envs=64, seed=0))
    t = train_cfg.get_config()    # the single-task DTs (and, via overrides, every other training run)
    t.num_steps = 500
    t.steps_per_call = 100
    t.checkpoint_every = 500
    t.log_every = 100
    t.model.hidden_size = 32
    t.model.n_layer = 2
    t.model.context_len = 10
    t.train.batch_size = 32
    t.train.learning_rate = 1e-3
    t.train.warmup_steps = 100
    c.train = t
    # the capacity comparison (C3): the common-init set again with these model overrides; {} skips it
    c.large = ml_collections.ConfigDict(dict(hidden_size=64))
    # the multi-task DT (shared trunk, per-task heads) and its per-task finetunes (ln_f and the
    # timestep embedding frozen, init_reg 1e-4 on the blocks, as the paper's P2)
    c.multi = ml_collections.ConfigDict(dict(
        model=dict(hidden_size=64, n_head=2, activation="gelu_new"), num_steps=500, batch_size=32,
        finetune_steps=200, finetune_train=dict(learning_rate=3e-4)))
    # P1's second step: the merged attn+mlp frozen, the rest finetuned per task (0 skips it)
    c.p1_finetune = ml_collections.ConfigDict(dict(num_steps=0))
    c.fisher = fisher_cfg.get_config()
    c.fisher.num_batches = 10
    c.fisher.batch_size = 32
    c.merge = merge_cfg.get_config()  # P3 grids; pipeline, checkpoints and eval are set per stage
    c.merge.lerp_ps = (0, 0.25, 0.5, 0.75, 1)
    c.merge.ta_lams = (0.5, 1)
    c.merge.ties_ks = (0.2, 0.5)
    c.merge.dare_ps = (0.3,)
    # report episodes: reset seed = the study seed; selection episodes (every "best of": P3 grids):
    # one reset seed per study seed, disjoint from the report seeds
    c.eval = ml_collections.ConfigDict(dict(episodes=5, max_steps=1000, executor="auto", select_seeds=(1000, 1001)))
    # the embedded pre-trained common init (claim C2, the paper's way): a multi-task DT with the
    # single-task trunk shape trained on every task's random-policy data, which no target DT sees
    c.pretrain = ml_collections.ConfigDict(dict(quality="random", transitions=20_000, num_steps=500, batch_size=32))
    # a claim is decided (true/false) when the 95% bootstrap CI of the difference of mean normalized
    # scores excludes 0 and the difference exceeds this many normalized points; otherwise it is null
    # beyond the paper: CMA-ES over per-block lerp p (multi-task DT -> P2 average) on closed-loop
    # return, each generation one batched evaluation on the selection episodes (generations=0 skips it)
    c.search = ml_collections.ConfigDict(dict(popsize=8, generations=4, episodes=2, groups="blocks"))
    # grouped training (mdt_jax/reproduce.py, train_groups): same-shaped DTs trained in one vmapped
    # program. mode "auto" groups every shape on GPU/TPU and, on CPU, shapes of hidden_size <= 32
    # (wider ones gain nothing there: docs/benchmarks.md); "on" groups every shape, "off" trains
    # each model alone. max_models caps a program's models (0: no cap); max_bytes is the memory budget a
    # group must fit, estimated from its shapes (0: a fraction of the device's memory)
    c.group = ml_collections.ConfigDict(dict(mode="auto", max_models=0, max_bytes=0))
    c.claims_min_effect = 0.5
    c.bootstrap_reps = 1000
    return c
