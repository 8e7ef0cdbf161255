"""Measure v5 reference returns. The config's docstring (configs/reference_returns.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import reference_returns_from_config

main = config_app("configs/reference_returns.py", reference_returns_from_config,
                  "Output directory (reference_returns.json).")

if __name__ == "__main__":
    run_app(main)
