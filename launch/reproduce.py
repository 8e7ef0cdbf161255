"""The project's main job. The config's docstring (configs/quickstart.py) gives the command."""
from absl import app

from launch._common import config_app

main = config_app("configs/quickstart.py", "quickstart", "Run directory (cached stages, results).")

if __name__ == "__main__":
    app.run(main)
