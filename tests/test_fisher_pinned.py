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

Other CPUs sum in other orders (tests/pinning.py): everywhere, the trace and mean must match the
recorded ones to 1e-6 and each leaf's sum the sums recorded on an AVX-512 machine to 1e-5; bit for
bit (the SHA-256) on a machine that recorded its own (`EXACT`, printed by ``python
tests/test_fisher_pinned.py``).
"""
import hashlib

import jax
import numpy as np
import pytest

from mdt_jax import fisher as F
from mdt_jax.data import segment_data, stack_segment_data
from mdt_jax.models import DTConfig, init_params
from pinning import fingerprint
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
    leaves = [np.asarray(x, np.float32) for x in jax.tree.leaves(r.fisher)]
    h = hashlib.sha256(b"".join(x.tobytes() for x in leaves))
    return {"sha256": h.hexdigest(), "trace": float(r.trace), "mean": float(r.mean),
            "n_timesteps": int(r.n_timesteps), "n_batches": r.n_batches,
            "leaf_sums": [float(np.sum(x, dtype=np.float64)) for x in leaves]}


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

LEAF_SUMS = {'exact_multi_2': [1.34045783e-07, 2.20151592e-07, 8.24741603e-05, 2.51570005e-07, 3.7434287e-10,
                   8.40960074e-11, 7.88710536e-10, 4.81970529e-10, 2.26333949e-07, 1.59901535e-06,
                   8.10640768e-05, 4.45337236e-06, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                   0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                   0.0],
 'exact_multi_None': [1.34045782e-07, 2.2015159e-07, 8.24741603e-05, 2.51570007e-07, 3.74342859e-10,
                      8.40960078e-11, 7.8871055e-10, 4.81970529e-10, 2.26333949e-07, 1.59901535e-06,
                      8.10640768e-05, 4.45337239e-06, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                      0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                      0.0, 0.0, 0.0],
 'exact_spec_None': [1.55985112e-07, 3.07942786e-07, 0.00010513149, 3.9264325e-07, 5.53933438e-10,
                     1.39982277e-10, 9.24402369e-10, 5.60824261e-10, 2.9786996e-07, 2.15398426e-06,
                     0.000105444547, 6.74728612e-06, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                     0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                     0.0, 0.0],
 'faithful_single_2': [1.07009883e-07, 3.20703611e-07, 5.80423107e-05, 5.64462853e-07, 1.652716e-10,
                       1.17627219e-10, 4.42220134e-10, 4.98647556e-10, 1.51753568e-07, 1.22270529e-06,
                       5.40564469e-05, 4.81776822e-06, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                       0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
 'faithful_single_None': [1.07009884e-07, 3.20703612e-07, 5.80423084e-05, 5.64462857e-07, 1.652716e-10,
                          1.17627219e-10, 4.42220155e-10, 4.9864758e-10, 1.51753568e-07, 1.22270528e-06,
                          5.4056447e-05, 4.81776821e-06, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                          0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
 'faithful_spec_2': [3.79494277e-07, 3.55511707e-07, 0.000224574073, 4.76870843e-07, 1.37787508e-09,
                     1.82528582e-10, 1.71948843e-09, 7.3661773e-10, 5.32828434e-07, 2.70951358e-06,
                     0.000230198649, 1.04932103e-05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                     0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                     0.0, 0.0]}  # recorded on an AVX-512 EPYC (9 digits)
EXACT = {  # {fingerprint: {case: sha256}}, printed by `python tests/test_fisher_pinned.py`
    'x86_64|AMD EPYC|avx,avx2,avx512_bf16,avx512_bitalg,avx512_vbmi2,avx512_vnni,avx512_vpopcntdq,avx512bw,avx512cd,avx512dq,avx512f,avx512ifma,avx512vbmi,avx512vl,fma|jaxlib 0.10.2':
        {'exact_multi_2': 'd47b786d1ad589f2a52b72a2f085633e69fdb50b9fd9fd18c7e18f5ce2958914',
         'exact_multi_None': 'b19dd8883cce1eb259287b2da8131d73f1d447ec9022b169e29a175c25d006b1',
         'exact_spec_None': '62ecb3a56bb1a4ba0ed9d660c2cc12edef742f7bd8a0de31649655126f6ee249',
         'faithful_single_2': 'e7fab985f67258758bbe54a8df408d66de896f0f2bcecab7b0ce95ad7aeb35e1',
         'faithful_single_None': '729303f22bd2ebfb196563fabceecea11a3f7574634db80b8532e22bdf83c751',
         'faithful_spec_2': '43bae81218735ccaaba20bac6fc1bcb0b31bc92b682e25351bb690abf25b2282'},
}


@pytest.mark.parametrize("method,kind,chunk_batches", CASES)
def test_fisher_is_bit_identical_to_the_recorded_code(method, kind, chunk_batches):
    case = f"{method}_{kind}_{chunk_batches}"
    got, want = summary(method, kind, chunk_batches), PINNED[case]
    assert (got["n_timesteps"], got["n_batches"]) == (want["n_timesteps"], want["n_batches"])
    np.testing.assert_allclose([got["trace"], got["mean"]], [want["trace"], want["mean"]], rtol=1e-6, atol=0)
    np.testing.assert_allclose(got["leaf_sums"], LEAF_SUMS[case], rtol=1e-5, atol=1e-12)
    here = EXACT.get(fingerprint(), {})
    if case in here:  # a machine that recorded its own bits
        assert got["sha256"] == here[case], f"{case}: the Fisher's bits moved on {fingerprint()}"


def test_the_pins_tell_the_two_paths_apart():
    for method, kind in (("faithful", "single"), ("exact", "multi")):
        assert PINNED[f"{method}_{kind}_None"]["sha256"] != PINNED[f"{method}_{kind}_2"]["sha256"]


if __name__ == "__main__":
    import pprint

    got = {f"{m}_{k}_{c}": summary(m, k, c) for m, k, c in CASES}
    pprint.pprint({c: {k: v for k, v in g.items() if k != "leaf_sums"} for c, g in got.items()}, width=110)
    print("LEAF_SUMS =", pprint.pformat({c: g["leaf_sums"] for c, g in got.items()}, width=110, compact=True))
    print("EXACT entry:", pprint.pformat({fingerprint(): {c: g["sha256"] for c, g in got.items()}}, width=110))
