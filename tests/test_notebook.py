"""notebooks/inspect_merge.ipynb runs top to bottom on tiny artifacts (real checkpoints and Fishers)."""
import os

import jax
import nbformat
import numpy as np
from nbclient import NotebookClient

from mdt_jax import checkpoint, fisher as F, fisher_stage as FS
from mdt_jax.data import segment_data
from mdt_jax.models import DTConfig, init_params
from synth import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inspect_merge_notebook_executes(tmp_path, monkeypatch):
    models, fishers = [], []
    for i, (task, sd, ad) in enumerate((("hopper", 11, 3), ("walker2d", 17, 6))):
        cfg = DTConfig(state_dim=sd, act_dim=ad, hidden_size=32, n_layer=2, n_head=1, context_len=5, max_ep_len=100)
        params = init_params(cfg, jax.random.key(i))
        ds = make_dataset(n_traj=6, state_dim=sd, act_dim=ad, seed=i)
        stats = {"state_mean": ds.observations.mean(0).tolist(), "state_std": (ds.observations.std(0) + 1e-6).tolist()}
        models.append(checkpoint.save(tmp_path / f"dt_{task}", jax.device_get(params), cfg,
                                      {"task": task, "rtg_scale": 1000.0, "steps": 0} | stats))
        data = segment_data(ds, cfg.context_len, cfg.max_ep_len)
        res = F.compute_fisher(cfg, params, data, jax.random.key(10 + i), num_batches=2, batch_size=8)
        fishers.append(FS.save_fisher(tmp_path / f"fisher_{task}", res, {"tasks": [task]}))
    for k, v in {"MDT_MODELS": ",".join(map(str, models)), "MDT_FISHERS": ",".join(map(str, fishers)),
                 "MDT_EPISODES": "2", "MDT_MAX_STEPS": "20", "MDT_PS": "0,0.5,1"}.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "inspect_merge.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert "hopper: H32 L2" in text and "merged with Fisher weights" in text and "finite: True" in text
    assert images == 4  # Fisher heatmap, distances, merge weights, interpolation curve
    assert "p=0.5" in text
    assert np.isfinite(float(text.split("p=0:")[1].split()[0]))
