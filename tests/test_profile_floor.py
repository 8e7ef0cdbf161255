"""benchmarks/profile_floor.py: its dot count against a hand count of the model's matmuls, the
count's recursion into sub-jaxprs, and its JSON at toy size (every time finite and > 0)."""
import collections
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import _common as C  # noqa: E402
from benchmarks import profile_floor as P  # noqa: E402

S, A, K = P.TS.S, P.TS.A, P.TS.K


def embed_flops(B, H):
    return 2 * B * K * H * (S + A + 1)  # embed_return, embed_state, embed_action


def block_flops(B, H, T, rows):
    """One block's matmuls for `rows` query tokens of T (keys and values over all T): q, k, v,
    q.k, p.v, c_proj, c_fc, mlp c_proj. Independent of the head count."""
    q_kv = 2 * rows * H * H + 2 * T * H * 2 * H
    return B * (q_kv + 4 * rows * T * H + 2 * rows * H * H + 2 * rows * H * 2 * 4 * H)


def eval_hand(b, H, L):
    """`evaluate.policy_step`: the step's 3 tokens embedded and projected by block 0's c_attn twice
    (before and after the action), block 0 from the cache on the ring's 3K tokens (no q, k, v
    projection), the last block for the state token, the action head."""
    T = 3 * K
    tokens = 2 * (2 * b * H * (S + A + 1) + 2 * b * 3 * H * 3 * H)
    if L == 1:  # block 0 is the last: its q, k and v all come from the cache
        return tokens + block_flops(b, H, T, 1) - b * (2 * H * H + 2 * T * H * 2 * H) + 2 * b * H * A
    block0 = block_flops(b, H, T, T) - 2 * b * T * H * 3 * H
    return tokens + block0 + (L - 2) * block_flops(b, H, T, T) + block_flops(b, H, T, 1) + 2 * b * H * A


def train_hand(B, H, L):
    """Forward (`outputs='action'`: the last block at the K state tokens), then two dots back per
    forward dot (input and weight gradients) except the embeddings' (their inputs are data)."""
    T = 3 * K
    fwd = embed_flops(B, H) + (L - 1) * block_flops(B, H, T, T) + block_flops(B, H, T, K) + 2 * B * K * H * A
    return 3 * fwd - embed_flops(B, H)


def flops(counts):
    return sum(d.flops * n for d, n in counts.items())


@pytest.mark.parametrize("shape", ["h128", "h512"])
def test_train_dots_match_a_hand_count(shape):
    # exact: both are integer counts of the same matmuls
    assert flops(P.count_dots(P.train_jaxpr(shape, hidden=16, layers=2, batch=4))) == train_hand(4, 16, 2)


def test_eval_dots_match_a_hand_count():
    for b in (4, 8):
        assert flops(P.count_dots(P.eval_jaxpr(b, hidden=16, layers=2))) == eval_hand(b, 16, 2)


def test_count_recurses_and_multiplies_scans():
    x, w, v = jnp.ones((4, 8)), jnp.ones((8, 8)), jnp.ones((8, 3))

    def f(x, w, v):
        body = jax.checkpoint(lambda c, _: (jnp.tanh(c @ w), None))
        c, _ = lax.scan(body, x, None, length=5)
        return jax.jit(lambda c: jax.nn.relu(c) @ v)(c)

    counts = P.count_dots(jax.make_jaxpr(f)(x, w, v))
    assert ({(d.lhs, d.rhs, d.kind): n for d, n in counts.items()}
            == {((4, 8), (8, 8), "nn"): 5, ((4, 8), (8, 3), "nn"): 1})
    assert flops(counts) == 5 * 2 * 4 * 8 * 8 + 2 * 4 * 8 * 3
    with pytest.raises(ValueError, match="while"):
        P.count_dots(jax.make_jaxpr(lambda x: lax.while_loop(lambda c: c[0, 0] < 9, lambda c: c @ w, x))(x))


@pytest.mark.parametrize("only", ["train_h512", "eval_h128"])
def test_toy_json(tmp_path, only):
    path = tmp_path / "floor.json"
    P.main(["--only", only, "--hidden", "16", "--layers", "1", "--batch", "4", "--repeats", "1", "--steps", "2",
            "--calls", "2", "--dot_s", "0.002", "--peak_n", "256", "--json", str(path)])
    out = json.loads(path.read_text())
    name = "train_h512" if only == "train_h512" else "eval_h128_b4"
    assert set(out) == {"peak_gflops", "args", name}
    r = out[name]
    for k in C.COMMON_KEYS:
        assert k in r
    assert r["speedup"] is None and r["speedup_vs_batched"] is None
    times = [r["measured_ms"], r["naive_floor_ms"], r["dot_ms"], r["cold_s"], r["warm_s"], r["floor_fraction"],
             *r["measured_ms_all"], *(d[k] for d in r["dots"] for k in ("alone_ms", "total_ms", "gflops"))]
    assert all(isinstance(t, float) and math.isfinite(t) and t > 0 for t in times), times
    assert math.isfinite(r["rest_ms"]) and r["rest_ms"] == pytest.approx(r["measured_ms"] - r["dot_ms"])
    assert r["dot_ms"] == pytest.approx(sum(d["total_ms"] for d in r["dots"]))
    assert r["dot_fraction"] == pytest.approx(r["dot_ms"] / r["measured_ms"])
    per_call = 2 if only == "train_h512" else 1
    assert r["warm_s"] == pytest.approx(r["measured_ms"] * per_call / 1e3)
    hand = train_hand(4, 16, 1) if only == "train_h512" else eval_hand(4, 16, 1)
    assert r["dot_gflop"] * 1e9 == pytest.approx(hand, rel=1e-12)
    assert r["dots_per_call"] == sum(d["count"] for d in r["dots"]) and r["distinct_dots"] == len(r["dots"])
    # XLA counts every dot the jaxpr has (none is dead here) and elementwise FLOPs besides
    assert 0 < r["dot_over_xla_flops"] <= 1.0 + 1e-6


HLO = """HloModule m

%fused_computation (param_0: f32[4,8], param_1: f32[8,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,8]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_tanh (param_0.1: f32[4,8]) -> f32[4,8] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  ROOT %tanh.1 = f32[4,8]{1,0} tanh(%param_0.1)
}

%fused_outer (param_0.2: f32[4,8]) -> f32[4,8] {
  %param_0.2 = f32[4,8]{1,0} parameter(0)
  %inner = f32[4,8]{1,0} fusion(%param_0.2), kind=kLoop, calls=%fused_tanh
  ROOT %x = u32[4,8]{1,0} xor(%inner, %inner)
}

ENTRY %main (p0: f32[4,8], p1: f32[8,8]) -> (f32[4,8], f32[8,4]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  %ynn_fusion = f32[4,8]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation
  %tanh_fusion = f32[4,8]{1,0} fusion(%ynn_fusion), kind=kLoop, calls=%fused_tanh
  %hash_fusion = f32[4,8]{1,0} fusion(%tanh_fusion), kind=kLoop, calls=%fused_outer
  %transpose.2 = f32[8,4]{1,0} transpose(%tanh_fusion), dimensions={1,0}, metadata={op_name="jit(f)/transpose"}
  %while.3 = (f32[4,8]{1,0}, s32[]) while(%tuple.1), condition=%cond, body=%body
  %dot.5 = f32[8,8]{1,0} dot(%p0, %ynn_fusion), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %tuple = (f32[4,8]{1,0}, f32[8,4]{1,0}) tuple(%hash_fusion, %transpose.2)
}
"""


def test_hlo_ops_follow_fusions_and_categorise_in_order():
    ops = P.hlo_ops(HLO)
    assert ops["ynn_fusion"] == {"parameter": 2, "dot": 1}
    assert ops["tanh_fusion"] == {"parameter": 1, "tanh": 1}
    assert ops["hash_fusion"] == {"parameter": 2, "tanh": 1, "xor": 1}  # the nested fusion's ops too
    assert ops["transpose.2"] == {"transpose": 1} and ops["while.3"] == {"while": 1}
    cat = {n: P.categorise(ops[n]) for n in ("ynn_fusion", "tanh_fusion", "hash_fusion", "transpose.2", "while.3")}
    assert cat == {"ynn_fusion": "dot", "tanh_fusion": "activation", "hash_fusion": "random bits",
                   "transpose.2": "transpose or copy", "while.3": None}
    assert P.categorise(collections.Counter({"broadcast": 1, "parameter": 1})) == "broadcast"
    assert P.categorise(collections.Counter({"exponential": 1, "parameter": 1})) == "other elementwise"


def test_hlo_ops_of_a_compiled_program_find_its_dot():
    f = jax.jit(lambda x, w: jnp.tanh(x @ w).T.sum(0))
    x = jnp.ones((16, 32))
    ops = P.hlo_ops(f.lower(x, x.T).compile().as_text())
    assert ops and any(P.categorise(o) == "dot" for o in ops.values())


def test_hlo_dots_belong_to_their_thunks_with_their_flops():
    assert P.hlo_dots(HLO) == {"ynn_fusion": [(2 * 4 * 8 * 8, "4x8 . 8x8 c[1][0]")],  # the fusion running it
                               "dot.5": [(2 * 8 * 8 * 4, "4x8 . 4x8 c[0][0]")]}      # a dot thunk of its own
    # a compiled forward and backward: every dot found, each counted once, with its FLOPs
    f = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))))
    w, x = jnp.ones((24, 8)), jnp.ones((40, 24))
    dots = P.hlo_dots(f.lower(w, x).compile().as_text())
    assert sorted(f for ds in dots.values() for f, _ in ds) == [2 * 40 * 24 * 8] * 2, dots


def test_toy_trace_sums_its_categories(tmp_path):
    path = tmp_path / "floor.json"
    P.main(["--only", "train_h512", "--hidden", "16", "--layers", "1", "--batch", "4", "--repeats", "1", "--steps",
            "2", "--dot_s", "0.002", "--peak_n", "256", "--trace", "--top", "3", "--json", str(path)])
    t = json.loads(path.read_text())["train_h512"]["trace"]
    assert set(t["categories"]) == set(P.CATEGORIES)
    assert t["thunk_ms"] == pytest.approx(sum(c["ms"] for c in t["categories"].values()))
    assert t["categories"]["dot"]["ms"] > 0 and t["categories"]["dot"]["thunks"] > 0
    assert t["thunk_ms"] > 0 and math.isfinite(t["traced_ms"]) and t["traced_ms"] > 0
    assert 0 < len(t["top_not_dot"]) <= 3 and all(r["category"] != "dot" for r in t["top_not_dot"])
    # every dot thunk's dots were found in the HLO: the rates by kernel sum to the dot category
    assert 0 < len(t["top_dots"]) <= 3 and all(r["gflop"] > 0 and r["category"] == "dot" for r in t["top_dots"])
    by = t["dots_by_emitter"]
    assert sum(e["thunks"] for e in by.values()) == t["categories"]["dot"]["thunks"]
    assert sum(e["ms"] for e in by.values()) == pytest.approx(t["categories"]["dot"]["ms"])
