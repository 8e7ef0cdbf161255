"""Train a single-task DT. The config's docstring (configs/train.py) gives the command."""
from absl import app, flags
from ml_collections import config_flags

from launch._common import run_or_exit

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train.py", "Training config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, final model).", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mdt_jax import run
    out = run_or_exit(run.train_from_config, _CONFIG.value, _WORKDIR.value)
    print(f"model: {out}")


if __name__ == "__main__":
    app.run(main)
