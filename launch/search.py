"""Search merge coefficients by CMA-ES on closed-loop return. The config's docstring (configs/search.py) gives the command."""
from launch._common import config_app, run_app

main = config_app("configs/search.py", "mdt_jax.search.search_from_config",
                  "Output directory (CMA state, search.json, the best model).")

if __name__ == "__main__":
    run_app(main)
