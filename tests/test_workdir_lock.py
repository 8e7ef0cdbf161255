"""`fileio.workdir_lock`: one process per workdir; a killed holder leaves no stale lock."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mdt_jax.fileio import WorkdirLockedError, lock_path, workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
HOLD = textwrap.dedent("""
    import sys, time
    from mdt_jax.fileio import workdir_lock
    with workdir_lock(sys.argv[1], beside=sys.argv[2] == "beside"):
        print("locked", flush=True)
        time.sleep(600)
""")


def _holder(workdir, where="inside"):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir), where], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def _kill(p):
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def test_lock_in_process(tmp_path):
    w = tmp_path / "a" / "w"
    with workdir_lock(w) as path:
        assert path == str(w / ".lock") and open(path).read().strip() == str(os.getpid())
        with pytest.raises(WorkdirLockedError, match=f"{w} is in use by another run \\(pid {os.getpid()},"):
            with workdir_lock(w):
                pass
        assert isinstance(WorkdirLockedError("x"), FileExistsError)
    assert not w.exists(), "the workdir this lock created (and nothing else wrote) is removed again"
    (w / "out").mkdir(parents=True)
    with workdir_lock(w):
        pass
    assert _files(w) == [] and (w / "out").is_dir(), "a workdir that existed keeps its contents, minus the lock"
    with workdir_lock(tmp_path / "f", beside=True) as path:
        assert path == str(tmp_path / ".f.lock") and not (tmp_path / "f").exists()
    assert not os.path.exists(lock_path(tmp_path / "f", beside=True))


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    w = tmp_path / "w"
    p = _holder(w)
    try:
        with pytest.raises(WorkdirLockedError, match=f"pid {p.pid}"):
            with workdir_lock(w):
                pass
    finally:
        _kill(p)
    assert (w / ".lock").exists(), "SIGKILL left the lock file (not the lock) behind"
    with workdir_lock(w):
        assert open(w / ".lock").read().strip() == str(os.getpid())


def _reference_returns(workdir):
    return subprocess.run([sys.executable, "-m", "launch.reference_returns", "--config.tasks=hopper",
                           "--config.episodes=100", "--config.max_steps=2", f"--workdir={workdir}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_launcher_refuses_a_locked_workdir_then_runs(tmp_path):
    w = tmp_path / "w"
    p = _holder(w)
    try:
        r = _reference_returns(w)
        assert r.returncode == 2, r.stderr[-1500:]
        assert f"in use by another run (pid {p.pid}" in r.stderr and str(w) in r.stderr, r.stderr[-1500:]
        assert "Traceback" not in r.stderr
        assert _files(w) == [".lock"], "the refused launcher wrote nothing"
    finally:
        _kill(p)
    r = _reference_returns(w)
    assert r.returncode == 0, r.stderr[-1500:]
    assert _files(w) == ["reference_returns.json"]


def test_fisher_launcher_locks_beside_its_output_folder(tmp_path):
    """fisher/gram refuse a non-empty output folder, so their lock is the sibling `.<name>.lock`."""
    w = tmp_path / "fisher_out"
    p = _holder(w, "beside")
    try:
        r = subprocess.run([sys.executable, "-m", "launch.fisher", "--config.checkpoint=/nowhere",
                            "--config.dataset=/nowhere.hdf5", f"--workdir={w}"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and f"pid {p.pid}" in r.stderr, r.stderr[-1500:]
        assert not w.exists()
    finally:
        _kill(p)
    r = subprocess.run([sys.executable, "-m", "launch.fisher", "--config.checkpoint=/nowhere",
                        "--config.dataset=/nowhere.hdf5", f"--workdir={w}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "nowhere" in r.stderr and "in use" not in r.stderr, r.stderr[-1500:]
    assert not w.exists() and os.listdir(tmp_path) == [], "the lock file left by the killed holder is removed"
