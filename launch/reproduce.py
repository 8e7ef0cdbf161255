"""The project's main job. The config's docstring (configs/quickstart.py) gives the command."""
from launch._common import config_app, run_app

main = config_app("configs/quickstart.py", "mdt_jax.reproduce.reproduce", "Run directory (cached stages, results).")

if __name__ == "__main__":
    run_app(main)
