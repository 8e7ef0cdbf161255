"""Evaluate a DT checkpoint with batched rollouts. The config's docstring (configs/evaluate.py) gives the command."""
from launch._common import config_app, run_app

main = config_app("configs/evaluate.py", "mdt_jax.run.evaluate_from_config", "Output directory (eval.json).")

if __name__ == "__main__":
    run_app(main)
