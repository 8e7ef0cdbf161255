"""Compute a DT's diagonal Fisher. The config's docstring (configs/fisher.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import fisher_from_config

main = config_app("configs/fisher.py", fisher_from_config,
                  "Output folder (fisher/ and fisher.json); must not exist.", lock_beside=True)

if __name__ == "__main__":
    run_app(main)
