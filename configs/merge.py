"""Merge trained DTs with one of the paper's pipelines, then evaluate every result.

    # P1: the attn+mlp of single-task DTs averaged (or Fisher-weighted), one model per task out
    python -m launch.merge --config=configs/merge.py --config.pipeline=p1 \
        --config.checkpoints=runs/dt_hopper/model,runs/dt_walker2d/model --workdir=runs/p1
    # P2: per-task finetunes of a multi-task DT, trunks merged, each task's heads copied in
    python -m launch.merge --config=configs/merge.py --config.pipeline=p2 --config.method=fisher \
        --config.checkpoints=runs/ft_hopper/model,runs/ft_walker2d/model \
        --config.fishers=runs/fisher_hopper,runs/fisher_walker2d --workdir=runs/p2
    # P2 with EMR-Merging: one unified trunk task vector against the base, a mask and a rescaler per task;
    # writes WORKDIR/emr (mdt_jax.emr.load_task_models rebuilds the task models from it and the base)
    python -m launch.merge --config=configs/merge.py --config.pipeline=p2 --config.method=emr \
        --config.base=runs/mt/model --config.checkpoints=runs/ft_hopper/model,runs/ft_walker2d/model --workdir=runs/emr
    # P1 with RegMean: each model's Grams first (python -m launch.gram, configs/gram.py)
    python -m launch.merge --config=configs/merge.py --config.pipeline=p1 --config.method=regmean \
        --config.checkpoints=runs/dt_hopper/model,runs/dt_walker2d/model \
        --config.grams=runs/gram_hopper,runs/gram_walker2d --workdir=runs/p1_regmean
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
    c.base = ""               # P3 and P2 emr (task-vector methods): the multi-task model before finetuning
    c.fishers = ""            # comma-separated Fisher folders aligned with checkpoints (method=fisher)
    c.grams = ""              # comma-separated Gram folders aligned with checkpoints (method=regmean; launch.gram)
    c.method = "average"      # P1/P2: average | fisher | regmean; P2 also emr (needs base; each task runs its own trunk)
    c.align = False           # P1: permute each model onto the first by weight matching before merging
    c.subset = ""             # empty: the pipeline's default (P1 attn,mlp; P2/P3 blocks)
    c.weights = ""            # average: comma-separated weights (empty: uniform)
    # fisher: unset = the reference's formula, guarded only where it divides by zero (the plain
    # average there); 0 = the reference exactly, NaN included; > 0 = added to each normalised Fisher
    c.floor = ml_collections.config_dict.placeholder(float)
    c.normalize_trace = True  # fisher: divide each model's Fisher by its trace
    c.trace_over = "fisher"   # fisher: the trace over the whole Fisher (the trunk, the reference) | subset
    c.regmean_alpha = 0.9     # regmean: off-diagonal Gram entries scaled by alpha (Jin et al.'s regulariser)
    c.lerp_ps = (0, 0.25, 0.5, 0.75, 1)
    c.ta_lams = (0.25, 0.5, 0.75, 1)
    c.ties_ks = (0.1, 0.2, 0.5)
    c.ties_lams = (1,)
    c.dare_ps = (0.1, 0.3, 0.5)
    c.seed = 0                # the evaluation episodes' reset seed (the reported episodes)
    # P3 "best": chosen on episodes of this reset seed (held out, != seed), reported on `seed`'s;
    # -1 chooses on the reported episodes themselves (optimistic)
    c.select_seed = -1
    c.eval_inputs = True      # also evaluate the models merged (P1 unmerged, P2/P3 finetunes and base)
    # own_task: a single-task model only on its own task (else on every task its dims fit)
    c.eval = ml_collections.ConfigDict(dict(episodes=10, max_steps=1000, executor="auto", own_task=False))
    return c
