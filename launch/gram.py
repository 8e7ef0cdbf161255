"""Compute a DT's trunk-Linear input Grams for RegMean. The config's docstring (configs/gram.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import gram_from_config

main = config_app("configs/gram.py", gram_from_config,
                  "Output folder (grams/ and grams.json); must not exist.", lock_beside=True)

if __name__ == "__main__":
    run_app(main)
