"""Merge DTs. The config docstring (configs/merge.py) gives the command."""
from absl import app, flags
from ml_collections import config_flags

from launch._common import run_or_exit

_CONFIG = config_flags.DEFINE_config_file("config", "configs/merge.py", "Merge config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (merged checkpoints, merge.json).", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mdt_jax import run
    print(run_or_exit(run.merge_from_config, _CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
