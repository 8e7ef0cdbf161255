"""Search per-block merge coefficients by CMA-ES on closed-loop return, then report the best.

    # lambda per block of task arithmetic over the per-task finetunes of a multi-task DT
    python -m launch.search --config=configs/search.py --config.method=task_arithmetic \
        --config.base=runs/mt/model --config.checkpoints=runs/ft_hopper/model,runs/ft_walker2d/model \
        --config.popsize=8 --config.generations=10 --workdir=runs/search_ta
    # a Fisher temperature per block (needs the finetunes' Fishers, aligned with the checkpoints)
    python -m launch.search --config=configs/search.py --config.method=fisher \
        --config.checkpoints=runs/ft_hopper/model,runs/ft_walker2d/model \
        --config.fishers=runs/fisher_hopper,runs/fisher_walker2d --workdir=runs/search_fisher

Methods (mdt_jax/search.py): lerp (p per group between the base and the P2 merge `merge`),
task_arithmetic, ties (k fixed), dare (p and its mask fixed) and fisher (temperature). theta = 0 is
the plain merge with the neutral coefficient (p0; lam0, 0 = 1/n_tasks for task arithmetic and
DARE, 1 for TIES; temperature 1), also reported as the baseline. `groups`: blocks (one coefficient
per transformer block), one, or ';'-separated groups of patterns (e.g. "attn;mlp").

Candidates are chosen on `selection_seed` episodes (eval.episodes per task and seed) and the best
one and the baseline are reported on `report_seed` episodes (eval.report_episodes); the two seed
lists (comma-separated ints) must not share a seed. `budget_episodes` (0: popsize x generations x
episodes x seeds x tasks) caps the selection episodes. The CMA state is saved after every
generation in WORKDIR (cma_state.npz, history.json): the same command resumes a killed search.
Writes WORKDIR/search.json and the best model as a checkpoint in WORKDIR/best.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoints = ""        # comma-separated: the per-task finetunes of one multi-task DT
    c.base = ""               # the multi-task model before finetuning (all methods but fisher)
    c.fishers = ""            # comma-separated Fisher folders aligned with checkpoints (fisher, or merge=fisher)
    c.method = "task_arithmetic"  # lerp | task_arithmetic | ties | dare | fisher
    c.merge = "average"       # lerp: the P2 merge it moves towards (average | fisher)
    c.subset = ""             # empty: the trunk blocks (P2's)
    c.groups = "blocks"       # blocks | one | ';'-separated groups of patterns
    c.p0 = 0.5                # lerp: p at theta = 0
    c.lam0 = 0.0              # task-vector methods: lambda at theta = 0 (0: the method's default)
    c.k = 0.2                 # ties: fraction of each task vector kept
    c.dare_p = 0.3            # dare: drop probability (the mask is drawn from `seed`)
    c.floor = ml_collections.config_dict.placeholder(float)  # fisher: as configs/merge.py (unset: the reference's formula, guarded)
    c.normalize_trace = True  # fisher: divide each model's Fisher by its trace
    c.popsize = 8
    c.generations = 10
    c.sigma = 0.5             # CMA-ES initial step size in theta
    c.seed = 0                # CMA-ES sampling (and the DARE mask)
    c.selection_seed = (1,)   # reset seeds of the selection episodes (--config.selection_seed=1,3)
    c.report_seed = (2,)      # reset seeds of the report episodes (disjoint)
    c.budget_episodes = 0
    c.eval = ml_collections.ConfigDict(dict(episodes=4, report_episodes=10, max_steps=1000, executor="auto"))
    return c
