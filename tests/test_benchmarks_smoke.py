"""benchmarks/evaluate.py at toy size (both torch peers, the cross-check, the common JSON keys), the
batched peer's replay check catching a wrong action, and benchmarks/_common.py's keys."""
import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import _common as C  # noqa: E402
from benchmarks import evaluate as E  # noqa: E402


def test_evaluate_toy_json(tmp_path):
    path = tmp_path / "eval.json"
    E.main(["--episodes", "2", "--sequential_episodes", "1", "--repeats", "1", "--tasks", "hopper",
            "--hidden", "16", "--layers", "1", "--context", "4", "--max_steps", "12", "--torch_threads", "1",
            "--no_breakdown", "--json", str(path)])
    out = json.loads(path.read_text())
    for k in C.COMMON_KEYS:
        assert isinstance(out[k], float) and math.isfinite(out[k]) and out[k] > 0, (k, out[k])
    assert out["warm_s"] == pytest.approx(out["tasks"]["hopper"]["batched_s"])
    assert out["speedup"] == pytest.approx(out["sequential_s"] / out["warm_s"])
    assert out["speedup_vs_batched"] == pytest.approx(out["torch_batched_s"] / out["warm_s"])
    r = out["tasks"]["hopper"]
    assert r["check"]["ok"] and r["check"]["batch"] == 2 and r["check"]["steps"] > 4 * 2  # windows rolled past K
    # the peers ran the same episodes as ours: same starts, same weights
    assert r["torch_batched_return_max_rel_diff"] < 1e-4 and r["sequential_return_max_rel_diff"] < 1e-4
    with pytest.raises(SystemExit):  # an existing --json is never overwritten
        E.main(["--episodes", "1", "--tasks", "hopper", "--json", str(path)])


def test_replay_catches_a_different_action():
    cfg, params = E.model("hopper", 16, 1, 4)
    dt, st = E.torch_dt(cfg, params), E.stats_for("hopper")
    starts = E.ev.reset_states(E.envs.get_task("hopper"), 2, E.SEED)
    run = E.Batched("hopper", starts, cfg, dt, st, 2, 9).run(record=True)
    seq = E.Sequential("hopper", starts, cfg, dt, st, 9)
    tr = run["trace"][1]
    assert len(tr["actions"]) > cfg.context_len
    assert seq.replay(tr["obs"], tr["rewards"], tr["actions"]) <= E.CHECK_TOL
    wrong = [a.copy() for a in tr["actions"]]
    wrong[-1][0] += 0.01
    assert seq.replay(tr["obs"], tr["rewards"], wrong) == pytest.approx(0.01, abs=E.CHECK_TOL)


def test_busy_s_is_the_union_of_the_executor_spans():
    ev = lambda s, d, name="ThunkExecutor::Execute", line="tf_XLAEigen/1": (line, name, s, d)
    events = [ev(0, 10), ev(5, 10, line="tf_XLAEigen/2"), ev(6, 2),  # 0-15: overlapping and nested
              ev(20, 5), ev(22, 100, name="fusion.3"),  # 20-25; a thunk event is not a span
              ev(30, 0)]
    assert C.busy_s(events) == pytest.approx(20e-9)
    assert C.busy_s([]) == 0.0


def test_breakdown_traces_a_warm_run():
    cfg, params = E.model("hopper", 16, 1, 4)
    st = E.stats_for("hopper")
    row = E.our_run(cfg, params, "hopper", st, 2, 6)
    b = E.breakdown(cfg, params, "hopper", st, 2, 6, row.lengths, calls=1)
    assert 0 < b["traced_xla_busy_s"] < b["traced_s"], b  # the policy ran inside the run, and the physics too
    assert b["policy_s"] > 0 and b["env_step_s"] > 0 and b["loop_steps"] == row.lengths.max()
    o = b["overlap"]
    assert o["halves"] == [1, 1] and o["two_lane_bound"] > 0, o
    assert all(o[k] > 0 for k in ("call_ms", "env_step_ms", "call_then_env_ms", "env_during_call_ms", "two_halves_ms"))


def test_common_keys():
    k = C.common_keys(warm_s=2.0, cold_s=5.0, peer_s=8.0, floor_s=1.0)
    assert k == {"speedup": 4.0, "speedup_vs_batched": None, "floor_fraction": 0.5, "cold_s": 5.0, "warm_s": 2.0}
    assert "speedup 4.00x (vs batched peer -)" in C.common_line(k)
    for bad in (dict(warm_s=0.0, cold_s=1.0), dict(warm_s=float("nan"), cold_s=1.0),
                dict(warm_s=1.0, cold_s=None), dict(warm_s=1.0, cold_s=1.0, peer_s=-1.0),
                dict(warm_s=1.0, cold_s=1.0, floor_s=np.inf)):
        with pytest.raises(ValueError, match="_s"):
            C.common_keys(**bad)


def test_study_flops_scale_with_the_config(monkeypatch, tmp_path):
    """benchmarks/study_flops.py counts from the config: doubling the training steps doubles exactly the
    single-task training stages, doubling the episodes doubles exactly the evaluation, and the JSON
    total is the sum of the stages."""
    from benchmarks import study as ST
    from benchmarks import study_flops as SF

    base = SF.study_flops("quickstart")
    assert all(v >= 0 for v in base["stages"].values()) and base["total"] > 0 and base["total"] == pytest.approx(sum(base["stages"].values()))

    def patched(edit):
        def cfg(which):
            c = ST.study_config(which)
            edit(c)
            return c
        monkeypatch.setattr(SF, "study_config", cfg)
        return SF.study_flops("quickstart")

    more_steps = patched(lambda c: setattr(c.train, "num_steps", 2 * c.train.num_steps))
    for k, v in base["stages"].items():
        want = 2 * v if k in ("train: single-task sets", "train: large set") else v
        assert more_steps["stages"][k] == pytest.approx(want), k
    more_eps = patched(lambda c: setattr(c.eval, "episodes", 2 * c.eval.episodes))
    assert more_eps["stages"]["evaluate"] == pytest.approx(2 * base["stages"]["evaluate"])
    assert more_eps["stages"]["search (CMA-ES episodes)"] == base["stages"]["search (CMA-ES episodes)"] > 0
    monkeypatch.undo()
    path = tmp_path / "flops.json"
    SF.main(["--shapes", "quickstart", "--rate", "1", "--json", str(path)])
    out = json.loads(path.read_text())
    assert out["minutes_at"]["1"] == pytest.approx(out["total"] / 1e12 / 60)


@pytest.mark.parametrize("argv", [["--modes", "together,bogus"], ["--", "--seeds=0,1"]])
def test_study_seeds_refuses_bad_modes_and_overrides_before_running_anything(tmp_path, argv):
    from benchmarks import study_seeds as S

    with pytest.raises(SystemExit) as e:
        S.main(["--config=configs/quickstart.py", f"--workdir={tmp_path / 'w'}", *argv])
    assert e.value.code == 2 and not (tmp_path / "w").exists()
