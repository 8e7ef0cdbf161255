"""Pick expert and medium behaviour policies. The config's docstring (configs/select_behaviour.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import select_behaviour_from_config

main = config_app("configs/select_behaviour.py", select_behaviour_from_config,
                  "A launch.train_behaviour run folder (holding policies/).")

if __name__ == "__main__":
    run_app(main)
