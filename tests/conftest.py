"""Shared test setup: a persistent XLA compilation cache, CPU only, float32, one BLAS thread."""
import os
import sys

# The launchers pin NumPy's BLAS to one thread (launch/_common.py); a matmul's summation order, and
# so e.g. the SAC behaviour policy's actions and every dataset collected with it, depends on the
# thread count. Pinned the same way here, an in-process run gives the bytes the CLI gives.
assert "numpy" not in sys.modules, "conftest must set OPENBLAS_NUM_THREADS before NumPy is imported"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MUJOCO_GL", "disable")
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get("MDT_JAX_CACHE", _CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The files that take longest, longest first; the others follow in their usual order. Under
# setup.cfg's `-n 2 --dist loadfile` each worker takes whole files from the front of this order as
# it frees up, so no long file starts last and runs alone while the other worker idles.
LONGEST_FIRST = ("test_reproduce.py", "test_device_check.py", "test_envs.py", "test_notebook.py", "test_lm.py",
                 "test_pipelines.py", "test_evaluate.py", "test_fisher.py", "test_model.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, the file's order
