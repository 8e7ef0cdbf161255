"""The project's main job. The config's docstring (configs/quickstart.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.reproduce import reproduce

main = config_app("configs/quickstart.py", reproduce, "Run directory (cached stages, results).")

if __name__ == "__main__":
    run_app(main)
