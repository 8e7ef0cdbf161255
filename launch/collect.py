"""Collect a dataset. The config's docstring (configs/collect.py) gives the command."""
from absl import app

from launch._common import config_app

main = config_app("configs/collect.py", "collect_from_config", "Output directory for the HDF5 file.")

if __name__ == "__main__":
    app.run(main)
