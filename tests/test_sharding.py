"""Several devices (mdt_jax.sharding): data-parallel training, Fisher batches split across devices
and evaluation with candidates or episodes split across devices all match one device.

XLA_FLAGS must be set before JAX starts, so the 8-device runs (tests/sharding_worker.py, on 8
forced CPU devices) go in a subprocess while this process does the same runs on its one device.
Sums that a split reorders (gradients, Fisher) agree to float tolerance, relative to each
tensor's scale. Rollouts are independent per device: the native evaluation's returns came out
bit-identical, the toy rollouts within 1e-6 (other per-device shapes may pick other kernels).
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mdt_jax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sharding_worker  # noqa: E402


def _worker(out, devices: int, **env) -> subprocess.Popen:
    """tests/sharding_worker.py in a process of `devices` forced CPU devices, writing `out`."""
    env = os.environ | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
                        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
                        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"} | env
    return subprocess.Popen([sys.executable, os.path.join(HERE, "sharding_worker.py"), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _results(procs, out, devices: int) -> dict:
    for proc in procs:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log.decode()[-4000:]
    res = dict(np.load(out))
    assert int(res.pop("n_devices")) == devices
    return res


@pytest.fixture(scope="module")
def one_and_eight(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding") / "eight.npz"
    proc = _worker(out, 8)
    try:
        one = sharding_worker.runs(None)  # meanwhile, the same runs on this process's single device
    except BaseException:
        proc.kill()
        raise
    return one, _results([proc], out, 8)


def _close(one, eight, prefix, rtol):
    """Every array named prefix* agrees to rtol, relative to its largest entry."""
    keys = [k for k in one if k.startswith(prefix)]
    assert keys and set(keys) <= set(eight)
    for k in keys:
        np.testing.assert_allclose(eight[k], one[k], rtol=rtol, atol=rtol * np.max(np.abs(one[k])), err_msg=k)


def test_data_parallel_training_matches_one_device(one_and_eight):
    # measured: 1.1e-5 of a tensor's scale after 10 steps at most; Adam's m / sqrt(v) turns the
    # rounding of near-zero gradients into steps of up to lr, so this is looser than the Fisher's
    _close(*one_and_eight, "train/", rtol=1e-4)


def test_fisher_split_over_devices_matches_one_device(one_and_eight):  # measured: 3e-7 of scale
    _close(*one_and_eight, "fisher_faithful/", rtol=1e-5)
    _close(*one_and_eight, "fisher_exact/", rtol=1e-5)


def test_evaluation_with_candidates_split_matches_one_device(one_and_eight):
    one, eight = one_and_eight
    np.testing.assert_array_equal(eight["eval_native/lengths"], one["eval_native/lengths"])
    _close(one, eight, "eval_native/returns", rtol=1e-5)


@pytest.mark.parametrize("candidates", [8, 2])  # 8: split by candidate; 2: by episode (3, padded to 8)
@pytest.mark.parametrize("starts", ["", "own_"])  # shared starts, or each candidate its own (seeds batched)
def test_rollouts_split_by_candidate_or_episode_match_one_device(one_and_eight, candidates, starts):
    one, eight = one_and_eight
    assert eight[f"rollouts_{starts}{candidates}"].shape == (candidates, 3)
    _close(one, eight, f"rollouts_{starts}{candidates}", rtol=1e-5)


def test_one_device_mesh_choice_and_errors():
    assert sharding.mesh_for(16) is None  # this process has one device: no mesh
    with pytest.raises(ValueError, match="2 devices asked for, 1 available"):
        sharding.mesh_for(16, 2)


def test_initialize_distributed_leaves_a_single_process_alone(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.initialize_distributed() is False
    assert jax.process_count() == 1


@pytest.mark.skipif(not os.environ.get("MDT_JAX_TEST_MULTIHOST"), reason="opt-in (MDT_JAX_TEST_MULTIHOST=1): "
                    "two processes of 2 CPU devices, about a minute more")
def test_two_hosts_match_one_device(one_and_eight, tmp_path):
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two_hosts.npz"
    procs = [_worker(out, 2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                     JAX_PROCESS_ID=str(i)) for i in range(2)]
    one, two = one_and_eight[0], _results(procs, out, 4)
    assert "eval_native/returns" not in two  # native physics stays on one host
    for prefix in ("train/", "fisher_faithful/", "fisher_exact/", "rollouts_"):
        _close(one, two, prefix, rtol=1e-4)
