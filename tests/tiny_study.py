"""The tiniest whole study (configs/quickstart.py, shrunk): every stage of mdt_jax.reproduce runs,
on two tasks, one seed, 1-layer H=16 DTs and a few dozen steps of everything. A config file for
`python -m launch.reproduce --config=tests/tiny_study.py` and the in-process tests alike."""
from configs import quickstart


def get_config(tasks="hopper,walker2d"):  # a string: `--config=tests/tiny_study.py:hopper,halfcheetah`
    c = quickstart.get_config()
    c.tasks, c.seeds = tuple(tasks.split(",")), (0,)
    c.data.transitions, c.data.num_envs = 2000, 16
    t = c.train
    t.num_steps, t.steps_per_call, t.checkpoint_every = 20, 10, 20
    t.model.hidden_size, t.model.n_layer, t.model.context_len = 16, 1, 5
    t.train.batch_size, t.train.warmup_steps = 16, 10
    c.large.hidden_size = 24
    c.multi.model.hidden_size, c.multi.model.n_head = 24, 2
    c.multi.num_steps, c.multi.batch_size, c.multi.finetune_steps = 20, 16, 10
    c.p1_finetune.num_steps = 10
    c.fisher.num_batches, c.fisher.batch_size = 2, 16
    c.merge.lerp_ps, c.merge.ta_lams, c.merge.ties_ks, c.merge.dare_ps = (0, 1), (1,), (0.5,), (0.3,)
    c.eval.episodes, c.eval.max_steps, c.eval.select_seeds = 2, 50, (1000,)
    c.pretrain.transitions, c.pretrain.num_steps, c.pretrain.batch_size = 2000, 20, 16
    c.bootstrap_reps = 200
    c.search.popsize, c.search.generations, c.search.episodes = 2, 1, 1
    return c
