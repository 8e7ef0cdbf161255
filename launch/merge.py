"""Merge trained DTs (P1, P2, P3) and evaluate the results. The config's docstring (configs/merge.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import merge_from_config

main = config_app("configs/merge.py", merge_from_config, "Output directory (merged checkpoints, merge.json).")

if __name__ == "__main__":
    run_app(main)
