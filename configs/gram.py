"""Input Gram matrices of a trained DT's trunk Linears on its dataset(s), for RegMean merging.

    python -m launch.gram --config=configs/gram.py --config.checkpoint=runs/dt_hopper/model \
        --config.dataset=PATH.hdf5 --workdir=runs/gram_hopper

Writes WORKDIR/grams/ (orbax: for every block's attn/c_attn, attn/c_proj, mlp/c_fc and mlp/c_proj
the (in, in) mean X^T X of its inputs over the unmasked tokens) and WORKDIR/grams.json (token and
batch counts and this run's settings); pass WORKDIR to `configs/merge.py`'s `grams` with
`method=regmean`. Forward passes only, no dropout; states are normalised with the checkpoint's own
state_mean/state_std, never the dataset's. A single-task checkpoint takes its task's dataset. A
multi-task finetune takes the dataset of the task it was finetuned on (`spec_info=True`, the
default: RegMean uses each model's own data); a multi-task model with `spec_info=False` takes one
dataset per task in the model's task order (the per-task Grams are averaged). See mdt_jax/regmean.py.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint = ""         # a DT model folder (launch.train's WORKDIR/model)
    c.dataset = ""            # .hdf5/.pkl path or minari:<id>; comma-separated per task with spec_info=False
    c.num_batches = 100       # per task
    c.batch_size = 64
    c.spec_info = True        # multi-task: only the checkpoint's own (finetuned) task
    c.seed = 0                # the batches drawn (the same as launch.fisher's with the same seed)
    return c
