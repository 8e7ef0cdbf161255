"""The launchers' persistent compilation cache: a second process evaluating the same shapes
compiles nothing (counted with jax.monitoring's cache events)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
from launch._common import enable_compile_cache
cache = enable_compile_cache()
import jax
from jax import monitoring
counts = {}
monitoring.register_event_listener(lambda name, **kw: counts.__setitem__(name, counts.get(name, 0) + 1))
import numpy as np
from mdt_jax import evaluate as ev
from mdt_jax.models import DTConfig, init_params
cfg = DTConfig(state_dim=11, act_dim=3, hidden_size=16, n_layer=1, context_len=4, max_ep_len=64)
params = init_params(cfg, jax.random.key(0))
stats = {"hopper": ev.TaskStats(np.zeros(11), np.ones(11), 3600.0, 1000.0)}
res = ev.evaluate(cfg, params, ["hopper"], stats, episodes=3, max_steps=20, seed=0, executor="native")
print(json.dumps({"cache": cache, "returns": res[0].returns.tolist(),
                  "misses": counts.get("/jax/compilation_cache/cache_misses", 0),
                  "hits": counts.get("/jax/compilation_cache/cache_hits", 0)}))
"""


def test_second_process_compiles_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env |= {"MDT_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    run = lambda: json.loads(subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, check=True,
                                            capture_output=True, text=True).stdout.strip().splitlines()[-1])
    first, second = run(), run()
    assert first["cache"] == str(tmp_path / "cache")
    assert first["misses"] > 0 and os.listdir(tmp_path / "cache")
    assert second["misses"] == 0 and second["hits"] >= first["misses"]
    assert second["returns"] == first["returns"]
