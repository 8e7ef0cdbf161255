"""Evaluate a DT checkpoint. The config's docstring (configs/evaluate.py) gives the command."""
from absl import app, flags
from ml_collections import config_flags

from launch._common import run_or_exit

_CONFIG = config_flags.DEFINE_config_file("config", "configs/evaluate.py", "Evaluation config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (eval.json).", required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mdt_jax import run
    report = run_or_exit(run.evaluate_from_config, _CONFIG.value, _WORKDIR.value)
    print(report)


if __name__ == "__main__":
    app.run(main)
