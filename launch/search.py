"""Search merge coefficients by CMA-ES on closed-loop return. The config's docstring (configs/search.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import search_from_config

main = config_app("configs/search.py", search_from_config,
                  "Output directory (CMA state, search.json, the best model).")

if __name__ == "__main__":
    run_app(main)
