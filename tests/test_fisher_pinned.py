"""The Fisher of a tiny model, pinned bit for bit to values recorded from the code before the
chunked, resumable path moved into `compute_fisher`'s dispatch (commit bb7db2a, where it was
`fisher._chunked_fisher`, and the one-scan path was `compute_fisher` itself).

Cases: both methods over a single-task model, a multi-task model over every task, and one task of
it (spec_info), each in one scan (`chunk_batches=None`) and in chunks of 2 batches of 5 (the last
chunk short). Each case is summarised by the SHA-256 of its Fisher tree's float32 bytes (leaves in
tree order), its trace and mean (exact float32 values) and its timestep count: an atol-0 check of
every entry. The two paths sum in different orders, so their hashes differ (also checked).
Recorded on CPU, float32, by ``python tests/test_fisher_pinned.py``; if a deliberate change to the
math moves them, re-record them in the same commit and say why.
"""
import hashlib

import jax
import numpy as np
import pytest

from mdt_jax import fisher as F
from mdt_jax.data import segment_data, stack_segment_data
from mdt_jax.models import DTConfig, init_params
from synth import make_dataset

CFG = DTConfig(state_dim=5, act_dim=2, hidden_size=8, n_layer=1, n_head=1, context_len=4, max_ep_len=64)
MCFG = DTConfig.multi_task([("a", 5, 2), ("b", 3, 1)], hidden_size=8, n_layer=1, context_len=4, max_ep_len=64)
RNG = jax.random.key(3)
CASES = [("faithful", "single", None), ("faithful", "single", 2), ("exact", "multi", None), ("exact", "multi", 2),
         ("faithful", "spec", 2), ("exact", "spec", None)]


def _problem(kind):
    da = segment_data(make_dataset(n_traj=5, state_dim=5, act_dim=2, seed=0), context_len=4, max_ep_len=64)
    if kind == "single":
        return CFG, init_params(CFG, jax.random.key(0)), da, None
    db = segment_data(make_dataset(n_traj=5, state_dim=3, act_dim=1, seed=1), context_len=4, max_ep_len=64)
    params = init_params(MCFG, jax.random.key(1))
    return (MCFG, params, stack_segment_data([da, db]), None) if kind == "multi" else (MCFG, params, db, "b")


def summary(method, kind, chunk_batches) -> dict:
    cfg, params, data, task = _problem(kind)
    r = jax.device_get(F.compute_fisher(cfg, params, data, RNG, num_batches=5, batch_size=4, method=method,
                                        task=task, chunk_batches=chunk_batches))
    h = hashlib.sha256(b"".join(np.asarray(x, np.float32).tobytes() for x in jax.tree.leaves(r.fisher)))
    return {"sha256": h.hexdigest(), "trace": float(r.trace), "mean": float(r.mean),
            "n_timesteps": int(r.n_timesteps), "n_batches": r.n_batches}


# ---- recorded constants (from the code at bb7db2a) ---------------------------------------------
PINNED = {'exact_multi_2': {'mean': 1.9544087592748838e-07,
                            'n_batches': 10,
                            'n_timesteps': 155,
                            'sha256': 'f4839b3238116f9ad858c61485812d6801c33c41a5972d5c56ac246db93b6fef',
                            'trace': 0.0003408488992135972},
          'exact_multi_None': {'mean': 1.9544087592748838e-07,
                               'n_batches': 10,
                               'n_timesteps': 155,
                               'sha256': '80b8364a81e803c1d576933062bf932cb0af0c186a1ce9e805ae49dcce958c90',
                               'trace': 0.0003408488992135972},
          'exact_spec_None': {'mean': 2.530205449602363e-07,
                              'n_batches': 5,
                              'n_timesteps': 76,
                              'sha256': 'c89049c31679510faa4baf8d63ef691cbfb3359272daa4560690bb23dfa30220',
                              'trace': 0.0002206339268013835},
          'faithful_single_2': {'mean': 1.3679401433819294e-07,
                                'n_batches': 5,
                                'n_timesteps': 79,
                                'sha256': '34de212d4f420e1a8e027feb3af90cb4aed569421db327dafcf97ff7807b6a49',
                                'trace': 0.00011928438470931724},
          'faithful_single_None': {'mean': 1.3679401433819294e-07,
                                   'n_batches': 5,
                                   'n_timesteps': 79,
                                   'sha256': 'a29235711d07e6dc5929b887f79ca034097b314c4f54bc5a67d02355f0c32138',
                                   'trace': 0.00011928438470931724},
          'faithful_spec_2': {'mean': 5.386745556279493e-07,
                              'n_batches': 5,
                              'n_timesteps': 76,
                              'sha256': '6742069496c5555b836de1d25c6c37c42a84bcdba4a4800ed913003eeb4f4894',
                              'trace': 0.00046972421114332974}}


@pytest.mark.parametrize("method,kind,chunk_batches", CASES)
def test_fisher_is_bit_identical_to_the_recorded_code(method, kind, chunk_batches):
    assert summary(method, kind, chunk_batches) == PINNED[f"{method}_{kind}_{chunk_batches}"]


def test_the_pins_tell_the_two_paths_apart():
    for method, kind in (("faithful", "single"), ("exact", "multi")):
        assert PINNED[f"{method}_{kind}_None"]["sha256"] != PINNED[f"{method}_{kind}_2"]["sha256"]


if __name__ == "__main__":
    import pprint

    pprint.pprint({f"{m}_{k}_{c}": summary(m, k, c) for m, k, c in CASES}, width=110)
