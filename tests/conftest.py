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
