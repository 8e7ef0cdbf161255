"""Train a DT (single-task, multi-task, or a per-task finetune). The config's docstring (configs/train.py) gives the command."""
from absl import app

from launch._common import config_app

main = config_app("configs/train.py", "train_from_config", "Run directory (checkpoints, metrics, final model).")

if __name__ == "__main__":
    app.run(main)
