"""Train a behaviour policy. The config's docstring (configs/behaviour.py) gives the command."""
from launch._common import config_app, run_app
from mdt_jax.run import train_behaviour_from_config

main = config_app("configs/behaviour.py", train_behaviour_from_config,
                  "Run folder: policies/, metrics.jsonl, and state/ (backend native, resumable) "
                  "or brax/ (backend brax: Brax's own checkpoints).")

if __name__ == "__main__":
    run_app(main)
