"""Evaluate a DT checkpoint with batched rollouts. The config's docstring (configs/evaluate.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import evaluate_from_config

main = config_app("configs/evaluate.py", evaluate_from_config, "Output directory (eval.json).")

if __name__ == "__main__":
    run_app(main)
