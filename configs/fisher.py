"""Diagonal Fisher of a trained DT on its dataset(s), for Fisher-weighted merging.

    python -m launch.fisher --config=configs/fisher.py --config.checkpoint=runs/dt_hopper/model \
        --config.dataset=PATH.hdf5 --workdir=runs/fisher_hopper

Writes WORKDIR/fisher/ (orbax, the Fisher tree in the params layout, zeros outside `subset`) and
WORKDIR/fisher.json (method, trace, mean, timesteps, batches and this run's settings); pass
WORKDIR to `configs/merge.py`'s `fishers`. States are normalised with the checkpoint's own
state_mean/state_std, never the dataset's. `method`: faithful (the reference: squared batch
gradients) or exact (squared per-example gradients); see mdt_jax/fisher.py. A multi-task
checkpoint takes one dataset per task in the model's task order (the per-task Fishers are
averaged, as the reference), or with `spec_info=True` one dataset for the task it was finetuned on.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint = ""         # a DT model folder (launch.train's WORKDIR/model)
    c.dataset = ""            # .hdf5/.pkl path or minari:<id>; comma-separated per task for multi-task models
    c.method = "faithful"     # faithful | exact
    c.num_batches = 100       # per task (the reference's f_num_batches)
    c.batch_size = 64         # the reference's f_batch_size
    c.subset = "blocks"       # parameter patterns/aliases (mdt_jax.subsets); the reference: the trunk blocks
    c.spec_info = False       # multi-task: only the checkpoint's own (finetuned) task
    c.chunk_batches = 25      # batches per saved partial sum (WORKDIR.partial/): a killed run resumes there
    c.seed = 0
    return c
