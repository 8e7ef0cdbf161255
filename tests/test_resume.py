"""Resumable stages: SIGKILL mid-stage, run the same command again, get the uninterrupted result.

(Training is covered in tests/test_train.py.) A half-written artifact is never loaded: every
final artifact is written to a temporary name and renamed into place.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from mdt_jax import checkpoint
from mdt_jax.models import DTConfig, init_params
from test_pipelines import SMALL, TASKS, _save_multi, perturbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _kill_when(cmd, ready, timeout=120):
    """Start `cmd`, SIGKILL it as soon as `ready()` holds; return whether it was still running."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


def test_collection_killed_then_resumed_writes_the_same_bytes(tmp_path):
    args = [sys.executable, "-m", "launch.collect", "--config=configs/collect.py", "--config.task=hopper",
            "--config.transitions=4000", "--config.num_envs=8", "--config.seed=3",
            "--config.slot_steps=100"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(args + [f"--workdir={full}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    waves = killed / ".hopper-random.hdf5.waves"
    assert _kill_when(args + [f"--workdir={killed}"],
                      lambda: waves.exists() and len([f for f in os.listdir(waves) if f.endswith(".npz")
                                                      and not f.endswith(".tmp.npz")]) >= 2)
    assert not (killed / "hopper-random.hdf5").exists()
    subprocess.run(args + [f"--workdir={killed}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert (full / "hopper-random.hdf5").read_bytes() == (killed / "hopper-random.hdf5").read_bytes()
    assert not waves.exists()


def test_merge_sweep_killed_then_resumed_equals_uninterrupted(tmp_path):
    cfg = DTConfig.multi_task(TASKS, **SMALL)
    pre = init_params(cfg, jax.random.key(0))
    base = _save_multi(tmp_path, cfg, pre)
    fts = [_save_multi(tmp_path, cfg, perturbed(pre, i + 1), t, f"ft_{t}") for i, (t, _, _) in enumerate(TASKS)]
    args = [sys.executable, "-m", "launch.merge", "--config=configs/merge.py", "--config.pipeline=p3",
            f"--config.base={base}", f"--config.checkpoints={','.join(fts)}", "--config.eval.episodes=2",
            "--config.eval.max_steps=10", "--config.lerp_ps=0,0.5,1", "--config.ta_lams=0.5,1",
            "--config.ties_ks=0.2", "--config.dare_ps=0.3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(args + [f"--workdir={full}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert _kill_when(args + [f"--workdir={killed}"], lambda: (killed / "stages" / "eval_pre.json").exists())
    assert not (killed / "merge.json").exists()
    subprocess.run(args + [f"--workdir={killed}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    a, b = (json.loads((d / "merge.json").read_text()) for d in (full, killed))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "checkpoint"} for r in rows]
    assert strip(a["rows"]) == strip(b["rows"])
    assert a["merge"]["p3_best"] == b["merge"]["p3_best"]
    for name in ["merged", "p3_ties_best", "p3_lerp_best"]:
        _, pa, _ = checkpoint.load(full / name)
        _, pb, _ = checkpoint.load(killed / name)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))


def test_fisher_killed_then_resumed_equals_uninterrupted(tmp_path):
    from mdt_jax import fisher_stage as F
    from mdt_jax.data import save_d4rl_hdf5
    from synth import make_dataset

    cfg = DTConfig(state_dim=11, act_dim=3, hidden_size=32, n_layer=2, n_head=1, context_len=10, max_ep_len=100)
    ds = make_dataset(n_traj=8)
    stats = {"state_mean": ds.observations.mean(0).tolist(), "state_std": (ds.observations.std(0) + 1e-6).tolist()}
    model = checkpoint.save(tmp_path / "model", jax.device_get(init_params(cfg, jax.random.key(0))), cfg,
                            {"task": "hopper", "rtg_scale": 1000.0} | stats)
    save_d4rl_hdf5(ds, str(tmp_path / "d.hdf5"))
    args = [sys.executable, "-m", "launch.fisher", "--config=configs/fisher.py", f"--config.checkpoint={model}",
            f"--config.dataset={tmp_path / 'd.hdf5'}", "--config.method=exact", "--config.num_batches=60",
            "--config.batch_size=32", "--config.chunk_batches=3"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(args + [f"--workdir={full}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    partial = tmp_path / "killed.partial"
    chunks = lambda: [f for f in os.listdir(partial) if f.startswith("model_batches_")] if partial.exists() else []
    assert _kill_when(args + [f"--workdir={killed}"], lambda: len(chunks()) >= 2)
    assert not killed.exists() and 2 <= len(chunks()) < 20
    subprocess.run(args + [f"--workdir={killed}"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert not partial.exists() and not (tmp_path / "full.partial").exists()
    (a, meta_a), (b, meta_b) = F.load_fisher(full), F.load_fisher(killed)
    assert a.n_batches == b.n_batches == 60 and int(a.n_timesteps) == int(b.n_timesteps)
    assert float(a.trace) == float(b.trace)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.fisher), jax.tree.leaves(b.fisher)))
