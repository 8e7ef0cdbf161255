"""Merge trained DTs with one of the paper's pipelines, then evaluate every result.

    # P1: the attn+mlp of single-task DTs averaged (or Fisher-weighted), one model per task out
    python -m launch.merge --config=configs/merge.py --config.pipeline=p1 \
        --config.checkpoints=runs/dt_hopper/model,runs/dt_walker2d/model --workdir=runs/p1
    # P2: per-task finetunes of a multi-task DT, trunks merged, each task's heads copied in
    python -m launch.merge --config=configs/merge.py --config.pipeline=p2 --config.method=fisher \
        --config.checkpoints=runs/ft_hopper/model,runs/ft_walker2d/model \
        --config.fishers=runs/fisher_hopper,runs/fisher_walker2d --workdir=runs/p2
    # P3: lerp / task arithmetic / TIES / DARE grids between the multi-task model (base) and finetunes
    python -m launch.merge --config=configs/merge.py --config.pipeline=p3 --config.base=runs/mt/model \
        --config.checkpoints=runs/ft_hopper/model,runs/ft_walker2d/model --workdir=runs/p3

Writes merged checkpoints (orbax + metadata naming the models, method, coefficients and subset)
and WORKDIR/merge.json. Each P3 grid is evaluated as one batched call over its candidates.
After P1, finetune the unmerged rest per task with
`python -m launch.train ... --config.init_from=WORKDIR/merged_<task> --config.train.freeze=attn,mlp`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pipeline = "p1"
    c.checkpoints = ""        # comma-separated model folders
    c.base = ""               # P3 (and task-vector methods): the multi-task model before finetuning
    c.fishers = ""            # comma-separated Fisher folders aligned with checkpoints (method=fisher)
    c.method = "average"      # P1/P2: average | fisher
    c.align = False           # P1: permute each model onto the first by weight matching before merging
    c.subset = ""             # empty: the pipeline's default (P1 attn,mlp; P2/P3 blocks)
    c.weights = ""            # average: comma-separated weights (empty: uniform)
    c.floor = 1e-8            # fisher: added to each normalised Fisher (0 reproduces the reference)
    c.normalize_trace = True  # fisher: divide each model's Fisher by its trace
    c.lerp_ps = "0,0.25,0.5,0.75,1"
    c.ta_lams = "0.25,0.5,0.75,1"
    c.ties_ks = "0.1,0.2,0.5"
    c.ties_lams = "1"
    c.dare_ps = "0.1,0.3,0.5"
    c.seed = 0
    c.eval_inputs = True      # also evaluate the models merged (P1 unmerged, P2/P3 finetunes and base)
    # own_task: a single-task model only on its own task (else on every task its dims fit)
    c.eval = ml_collections.ConfigDict(dict(episodes=10, max_steps=1000, executor="auto", own_task=False))
    return c
