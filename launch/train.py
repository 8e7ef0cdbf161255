"""Train a DT (single-task, multi-task, or a per-task finetune). The config's docstring (configs/train.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import train_from_config

main = config_app("configs/train.py", train_from_config, "Run directory (checkpoints, metrics, final model).")

if __name__ == "__main__":
    run_app(main)
