"""Collect a dataset. The config's docstring (configs/collect.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import collect_from_config

main = config_app("configs/collect.py", collect_from_config, "Output directory for the HDF5 file.")

if __name__ == "__main__":
    run_app(main)
