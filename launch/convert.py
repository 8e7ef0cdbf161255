"""Convert DT checkpoints between PyTorch and mdt_jax.

    # transformers DecisionTransformerModel (save_pretrained folder) -> mdt_jax checkpoint
    python -m launch.convert --from=hf --src=HF_DIR --out=CKPT_DIR [--context_len=20]
    # reference merging-code state dict (.pt) -> mdt_jax checkpoint
    python -m launch.convert --from=reference --src=MODEL.pt --out=CKPT_DIR \
        [--n_head=1 --activation=relu --context_len=20 --task_names=hopper,halfcheetah,walker2d]
    # mdt_jax checkpoint -> transformers folder (single-task, timestep_embedding=before_ln)
    python -m launch.convert --to=hf --src=CKPT_DIR --out=HF_DIR

Reference checkpoints saved as whole pickled models are refused (loading them would run code);
the error message shows how to re-save one as a state dict. See mdt_jax/interop.py.
"""
import os

from absl import app, flags

from launch._common import run_or_exit

flags.DEFINE_enum("from", None, ["hf", "reference"], "Import from this PyTorch format.")
flags.DEFINE_enum("to", None, ["hf"], "Export an mdt_jax checkpoint to this format.")
_SRC = flags.DEFINE_string("src", None, "Source folder or file.", required=True)
_OUT = flags.DEFINE_string("out", None, "Destination folder.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing destination.")
_CONTEXT_LEN = flags.DEFINE_integer("context_len", None, "K for imports (default: HF config.json's, else 20).")
_N_HEAD = flags.DEFINE_integer("n_head", 1, "reference: attention heads (shapes cannot tell).")
_ACTIVATION = flags.DEFINE_enum("activation", "relu", ["relu", "gelu", "gelu_new"], "reference: MLP activation.")
_TASKS = flags.DEFINE_list("task_names", None, "reference multi-task: task names in the model's order.")
FLAGS = flags.FLAGS


def convert(src: str, out: str, src_format: str | None, dst_format: str | None, *, overwrite: bool = False,
            context_len: int | None = None, n_head: int = 1, activation: str = "relu",
            task_names=None) -> str:
    """Convert `src` to `out`: import (`src_format`) into an mdt_jax checkpoint, or export one."""
    if (src_format is None) == (dst_format is None):
        raise ValueError("give exactly one of --from=hf|reference (import) or --to=hf (export)")
    if not os.path.exists(src):
        raise FileNotFoundError(f"--src {src} does not exist")
    from mdt_jax import checkpoint, interop  # heavy: only once the arguments make sense

    if dst_format == "hf":
        cfg, params, _ = checkpoint.load(src)
        return interop.export_hf(cfg, params, out, overwrite=overwrite)
    if src_format == "hf":
        cfg, params = interop.import_hf(src, context_len=context_len)
    else:
        cfg, params = interop.import_reference(src, n_head=n_head, context_len=context_len or 20,
                                               activation=activation, task_names=task_names)
    meta = {"converted_from": src_format, "source": os.path.abspath(src)}
    return checkpoint.save(out, params, cfg, meta, overwrite=overwrite)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = run_or_exit(convert, _SRC.value, _OUT.value, FLAGS["from"].value, FLAGS["to"].value,
                      overwrite=_OVERWRITE.value, context_len=_CONTEXT_LEN.value, n_head=_N_HEAD.value,
                      activation=_ACTIVATION.value, task_names=_TASKS.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
