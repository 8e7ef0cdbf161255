"""Evaluate a DT checkpoint with batched rollouts. The config's docstring (configs/evaluate.py) gives the command."""
from absl import app

from launch._common import config_app

main = config_app("configs/evaluate.py", "evaluate_from_config", "Output directory (eval.json).")

if __name__ == "__main__":
    app.run(main)
