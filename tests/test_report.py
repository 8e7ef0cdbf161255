"""mdt_jax.report (rliable statistics, tables, figures) and the Gymnasium-v5 reference returns."""
import json
import os

import ml_collections
import numpy as np
import pytest
import scipy.stats
from rliable import library, metrics

from mdt_jax import envs, report

TASKS = ["hopper", "walker2d", "halfcheetah"]
REPS = 200
PNG = b"\x89PNG\r\n\x1a\n"


def _scores(seed=0, runs=22, shift=0.0):
    r = np.random.default_rng(seed)
    return r.normal(50 + shift, 15, (runs, len(TASKS))) + np.array([0.0, 10.0, -5.0])


def _three(x):
    return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x), metrics.aggregate_median(x)])


def test_interval_estimates_equal_rliable_and_bracket_points():
    a, b = _scores(0), _scores(1, runs=18)
    state = np.random.get_state()
    est = report.interval_estimates({"A": a, "B": b}, tasks=TASKS, reps=REPS, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(state[1:], np.random.get_state()[1:]))  # caller's RNG restored
    for name, x in (("A", a), ("B", b)):
        got = est["methods"][name]
        assert got["runs"] == x.shape[0]
        np.random.seed(3)
        point, ci = library.get_interval_estimates({"x": x}, _three, reps=REPS)
        for i, k in enumerate(report.METRICS):
            assert got["all"][k]["point"] == pytest.approx(point["x"][i], rel=1e-12)
            assert got["all"][k]["ci"] == pytest.approx(list(ci["x"][:, i]), rel=1e-12)
        for j, t in enumerate(TASKS):  # task j's column of the same stratified resamples
            np.random.seed(3)
            col = lambda v, j=j: np.array([metrics.aggregate_iqm(v[:, [j]]), metrics.aggregate_mean(v[:, [j]])])
            point, ci = library.get_interval_estimates({"x": x}, col, reps=REPS)
            for i, k in enumerate(("iqm", "mean")):
                assert got["tasks"][t][k]["point"] == pytest.approx(point["x"][i], rel=1e-12)
                assert got["tasks"][t][k]["ci"] == pytest.approx(list(ci["x"][:, i]), rel=1e-12)
        for e in [got["all"]] + list(got["tasks"].values()):
            for k in report.METRICS:
                lo, hi = e[k]["ci"]
                assert lo <= e[k]["point"] <= hi and lo < hi
    # deterministic, and the per-task mapping form {task: (seeds, episodes)} is the same data
    per_task = {t: a[:, j].reshape(2, 11) for j, t in enumerate(TASKS)}
    again = report.interval_estimates({"A": per_task}, reps=REPS, seed=3)
    assert again["methods"]["A"] == est["methods"]["A"] and again["tasks"] == TASKS
    other = report.interval_estimates({"A": a}, tasks=TASKS, reps=REPS, seed=4)
    assert other["methods"]["A"]["all"]["mean"]["ci"] != est["methods"]["A"]["all"]["mean"]["ci"]


def test_iqm_is_the_trimmed_mean_of_the_pooled_runs():
    a = _scores(5, runs=23)  # 23 * 3 = 69 pooled runs: the 25% cut is not a whole quarter
    e = report.interval_estimates({"A": a}, tasks=TASKS, reps=REPS)["methods"]["A"]
    assert e["all"]["iqm"]["point"] == pytest.approx(scipy.stats.trim_mean(a.reshape(-1), 0.25))
    assert e["all"]["mean"]["point"] == pytest.approx(a.mean(0).mean())
    assert e["all"]["median"]["point"] == pytest.approx(np.median(a.mean(0)))
    for j, t in enumerate(TASKS):
        assert e["tasks"][t]["iqm"]["point"] == pytest.approx(scipy.stats.trim_mean(a[:, j], 0.25))
        assert e["tasks"][t]["mean"]["point"] == pytest.approx(a[:, j].mean())


def test_paired_ci_is_narrower_on_correlated_runs():
    r = np.random.default_rng(7)
    start = r.normal(0, 20, (30, 3))  # what an episode start and seed do to both methods alike
    a = start + 1.0 + r.normal(0, 0.5, start.shape)
    b = start + r.normal(0, 0.5, start.shape)
    paired = report.compare(a, b, paired=True, reps=REPS, seed=1, min_effect=0.5)
    unpaired = report.compare(a, b, paired=False, reps=REPS, seed=1, min_effect=0.5)
    assert paired["diff"] == pytest.approx(unpaired["diff"]) == pytest.approx(a.mean() - b.mean())
    assert report.half_width(paired["diff_ci"]) < report.half_width(unpaired["diff_ci"]) / 5
    assert paired["diff_ci"][0] > 0 and paired["decided"] is True
    assert unpaired["diff_ci"][0] < 0 < unpaired["diff_ci"][1] and unpaired["decided"] is None
    np.random.seed(1)  # the paired CI is rliable's StratifiedBootstrap over both arrays at once
    want = library.StratifiedBootstrap(a, b).conf_int(
        lambda x, y: np.array([metrics.aggregate_mean(x) - metrics.aggregate_mean(y)]), reps=REPS,
        method="percentile")
    assert paired["diff_ci"] == pytest.approx(list(want[:, 0]))
    assert paired["poi"] == unpaired["poi"] == pytest.approx(metrics.probability_of_improvement(a, b))
    iqm = report.compare(a, b, metric="iqm", reps=REPS)
    assert iqm["diff"] == pytest.approx(scipy.stats.trim_mean(a, 0.25, axis=None) - scipy.stats.trim_mean(b, 0.25, axis=None))


def _nested(S=4, E=12, seed_sd=8.0, ep_sd=3.0, effect=1.0, rng=0):
    """{task: (S, E)} scores for A and B where each training seed moves A - B by its own offset."""
    r = np.random.default_rng(rng)
    a, b = {}, {}
    # one seed trains every task's model, so its offset is shared across tasks; +-seed_sd in turn
    offsets = seed_sd * np.resize([-1.0, 1.0, -0.75, 0.75], S)
    for t in TASKS:
        start = r.normal(0, 20, (S, E))
        b[t] = start + r.normal(0, ep_sd, (S, E))
        a[t] = start + effect + offsets[:, None] + r.normal(0, ep_sd, (S, E))
    return a, b


def test_seed_level_ci_is_the_two_level_bootstrap():
    """Against a plain loop over the same draws: seeds with replacement (one draw for all tasks),
    then each drawn seed's episodes per task, A and B paired."""
    a, b = _nested()
    reps = 100
    got = report.seed_level_ci(a, b, reps=reps, seed=5)
    rng = np.random.default_rng(5)
    S, E = a[TASKS[0]].shape
    seeds = rng.integers(0, S, (reps, S))
    eps = {t: rng.integers(0, E, (reps, S, E)) for t in sorted(TASKS)}
    stats = []
    for k in range(reps):
        per_task = []
        for t in TASKS:
            vals = [a[t][s, e] - b[t][s, e] for i, s in enumerate(seeds[k]) for e in eps[t][k, i]]
            per_task.append(np.mean(vals))
        stats.append(np.mean(per_task))
    assert got == pytest.approx([np.quantile(stats, 0.025), np.quantile(stats, 0.975)], abs=1e-12)
    assert report.seed_level_ci(a, b, reps=reps, seed=5) == got  # deterministic
    with pytest.raises(ValueError, match="seeds >= 2"):
        report.seed_level_ci({t: v[:1] for t, v in a.items()}, {t: v[:1] for t, v in b.items()})
    with pytest.raises(ValueError, match="same tasks"):
        report.seed_level_ci(a, {t: b[t] for t in TASKS[:2]})
    with pytest.raises(ValueError, match="seeds >= 2"):  # no silent broadcast of one seed against four
        report.seed_level_ci(a, {t: v[:1] for t, v in b.items()})
    with pytest.raises(ValueError, match="bootstrap_reps"):
        report.seed_level_ci(a, b, reps=5)


def test_seed_level_ci_keeps_the_variance_between_training_runs():
    """With a large per-seed offset, rliable's runs = seeds x episodes CI is narrow and decides,
    the seed-level one is wide and does not; with no seed offset the two agree in width."""
    a, b = _nested(seed_sd=8.0)
    c = report.compare(a, b, reps=1000, seed=0, min_effect=0.5)
    assert report.half_width(c["diff_ci_seeds"]) > 3 * report.half_width(c["diff_ci"])
    assert c["decided_seeds"] is None
    a0, b0 = _nested(seed_sd=0.0, S=6, E=20)
    c0 = report.compare(a0, b0, reps=1000, seed=0)
    ratio = report.half_width(c0["diff_ci_seeds"]) / report.half_width(c0["diff_ci"])
    assert 0.7 < ratio < 1.6, ratio
    flat = report.compare(np.stack([a[t].ravel() for t in TASKS], 1), np.stack([b[t].ravel() for t in TASKS], 1),
                          reps=REPS)
    assert "diff_ci_seeds" not in flat  # a (runs, tasks) matrix carries no seeds


def test_probability_of_improvement_is_one_when_a_dominates():
    b = _scores(2)
    a = b + (b.max() - b.min()) + 1.0  # every run of A above every run of B
    c = report.compare(a, b, reps=REPS)
    assert c["poi"] == 1.0 and c["poi_ci"] == [1.0, 1.0]
    assert report.compare(b, a, reps=REPS, min_effect=0.0)["decided"] is False
    same = report.compare(b, b, reps=REPS, min_effect=0.0)
    assert same["poi"] == 0.5 and same["diff_ci"] == [0.0, 0.0] and same["decided"] is None


def test_decide_on_hand_made_cis():
    assert report.decide((1.0, 3.0), 0.5, effect=2.0) is True
    assert report.decide((1.0, 3.0), 2.5, effect=2.0) is None       # significant, too small
    assert report.decide((-3.0, -1.0), 0.5, effect=-2.0) is False
    assert report.decide((-3.0, -1.0), 2.0, effect=-2.0) is None     # |effect| must exceed min_effect
    assert report.decide((-1.0, 2.0), 0.0, effect=0.5) is None       # CI straddles 0
    assert report.decide((0.0, 2.0), 0.0, effect=1.0) is None        # the lower end must be > 0
    assert report.decide({"diff": 2.0, "diff_ci": [1.0, 3.0]}, 1.0) is True
    assert report.half_width((1.0, 3.0)) == 1.0 and report.half_width({"ci": [-1, 5]}) == 3.0
    with pytest.raises(ValueError, match="claims_min_effect"):
        report.decide((1.0, 3.0), -0.1, effect=2.0)
    with pytest.raises(ValueError, match="effect"):
        report.decide((1.0, 3.0), 0.5)
    with pytest.raises(ValueError, match="lo <= hi"):
        report.decide((3.0, 1.0), 0.5, effect=2.0)
    with pytest.raises(ValueError, match="ci"):
        report.decide((np.nan, 1.0), 0.5, effect=0.0)


def test_bad_inputs_raise_naming_the_field():
    a = _scores(0)
    with pytest.raises(ValueError, match="bootstrap_reps"):
        report.interval_estimates({"A": a}, reps=99)
    with pytest.raises(ValueError, match="bootstrap_reps"):
        report.compare(a, a, reps=50)
    with pytest.raises(ValueError, match="claims_min_effect"):
        report.compare(a, a, reps=REPS, min_effect=-1.0)
    with pytest.raises(ValueError, match="empty"):
        report.interval_estimates({"A": np.zeros((0, 3))}, reps=REPS)
    with pytest.raises(ValueError, match="no tasks"):
        report.interval_estimates({"A": {}}, reps=REPS)
    with pytest.raises(ValueError, match="ragged"):
        report.interval_estimates({"A": {"hopper": np.ones((2, 5)), "walker2d": np.ones((2, 4))}}, reps=REPS)
    with pytest.raises(ValueError, match="rectangular"):
        report.interval_estimates({"A": [[1.0, 2.0], [3.0]]}, reps=REPS)
    bad = a.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"scores\['B'\].*non-finite.*run 4 of task 'walker2d'"):
        report.interval_estimates({"A": a, "B": bad}, tasks=TASKS, reps=REPS)
    with pytest.raises(ValueError, match=">= 2 runs"):
        report.interval_estimates({"A": a[:1]}, reps=REPS)
    ta = {t: a[:, j] for j, t in enumerate(TASKS)}
    tb = {"hopper": a[:, 0], "walker2d": a[:, 1], "ant": a[:, 2]}
    with pytest.raises(ValueError, match="mismatched tasks.*ant"):
        report.compare(ta, tb, reps=REPS)
    with pytest.raises(ValueError, match="mismatched tasks"):
        report.compare(a, a[:, :2], reps=REPS)
    with pytest.raises(ValueError, match=r"scores\['B'\].*ant"):
        report.interval_estimates({"A": ta, "B": tb}, reps=REPS)
    with pytest.raises(ValueError, match="paired"):
        report.compare(a, a[:10], reps=REPS)
    assert report.compare(a, a[:10], paired=False, reps=REPS)["runs_b"] == 10
    with pytest.raises(ValueError, match="metric"):
        report.compare(a, a, reps=REPS, metric="max")
    # a mapping in another task order is aligned by name, not by position
    shuffled = {t: ta[t] for t in reversed(TASKS)}
    assert report.compare(ta, shuffled, reps=REPS)["diff_ci"] == [0.0, 0.0]


def test_tables():
    a, b = _scores(0), _scores(1, shift=20.0)
    est = report.interval_estimates({"A": a, "B": b}, tasks=TASKS, reps=REPS)
    md = report.estimates_markdown(est)
    lines = md.splitlines()
    assert lines[0] == "| method | task | mean [95% CI] | IQM [95% CI] | n runs |"
    e = est["methods"]["B"]["all"]
    assert (f"| B | all tasks | {e['mean']['point']:.1f} [{e['mean']['ci'][0]:.1f}, {e['mean']['ci'][1]:.1f}] | "
            f"{e['iqm']['point']:.1f} [{e['iqm']['ci'][0]:.1f}, {e['iqm']['ci'][1]:.1f}] | 22 |") in lines
    assert sum(line.startswith("| A | ") for line in lines) == len(TASKS) + 1
    c = report.compare(b, a, reps=REPS, names=("B", "A"), min_effect=1.0)
    cm = report.claims_markdown({"C1": c})
    assert "| claim | A | B | diff [CI] | P(A>B) [CI] | decided |" in cm
    assert f"| C1 | B | A | {c['diff']:.1f} [{c['diff_ci'][0]:.1f}, {c['diff_ci'][1]:.1f}] (mean, paired) |" in cm
    assert cm.splitlines()[2].endswith("| True |")


def test_figures_are_valid_pngs_written_atomically(tmp_path):
    import matplotlib.image

    a, b = _scores(0, runs=10), _scores(1, runs=10, shift=10.0)
    est = report.interval_estimates({"A": a, "B": b}, tasks=TASKS, reps=REPS)
    paths = [report.plot_intervals(est, tmp_path / "intervals.png"),
             report.plot_profile({"A": a, "B": b}, tmp_path / "profile.png", reps=REPS),
             report.plot_curve([0.0, 0.5, 1.0], [{"A": a + k, "B": b} for k in (0, 5, 10)], tmp_path / "curve.png",
                               reps=REPS, xlabel="p")]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert sorted(os.listdir(tmp_path)) == ["curve.png", "intervals.png", "profile.png"]  # no temporaries left
    before = (tmp_path / "profile.png").read_bytes()
    with pytest.raises(FileExistsError):
        report.plot_profile({"A": a}, tmp_path / "profile.png", reps=REPS)
    assert (tmp_path / "profile.png").read_bytes() == before
    with pytest.raises(ValueError, match="methods"):
        report.plot_curve([0.0, 1.0], [{"A": a}, {"B": b}], tmp_path / "bad.png", reps=REPS)
    with pytest.raises(ValueError, match="xs"):
        report.plot_curve([0.0, np.nan], [{"A": a}, {"A": a}], tmp_path / "bad.png", reps=REPS)
    with pytest.raises(ValueError, match="estimates"):
        report.plot_intervals({"rows": []}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ------------------------------------------------------------------------- v5 reference returns

def test_v5_normalized_score_anchors():
    table = json.load(open(os.path.join(os.path.dirname(envs.__file__), "v5_reference.json")))
    assert table["command"].startswith("python -m launch.reference_returns")
    for t in TASKS:
        row = table["tasks"][t]
        lo, hi = row["random"]["mean"], row["expert"]["mean"]
        assert row["random"]["episodes"] >= 100 and row["expert"]["episodes"] >= 100
        assert envs.v5_reference(t) == (lo, hi)
        assert envs.v5_normalized_score(t, lo) == pytest.approx(0.0, abs=1e-9)
        assert envs.v5_normalized_score(t, hi) == pytest.approx(100.0)
        np.testing.assert_allclose(envs.v5_normalized_score(t, np.array([lo, hi])), [0.0, 100.0], atol=1e-9)
        # D4RL's gym-v2 anchors are other numbers: the two scores are not interchangeable
        assert envs.normalized_score(t, hi) != pytest.approx(100.0, abs=0.5)


def test_reference_returns_command_reproduces_the_random_row(tmp_path):
    from mdt_jax import run
    from mdt_jax.behaviour import reference

    # random hoppers fall within ~30 steps, so the committed random row is cheap to re-measure
    committed = envs.tasks._v5_table()
    ret, length = reference.rollout_returns("hopper", lambda obs, rng: rng.uniform(-1, 1, (obs.shape[0], 3)),
                                            committed["episodes"], committed["seed"])
    assert length.max() < 1000
    assert float(ret.mean()) == pytest.approx(committed["tasks"]["hopper"]["random"]["mean"], rel=1e-9)
    cfg = ml_collections.ConfigDict(dict(tasks="hopper", episodes=100, seed=0, max_steps=3, overwrite=False))
    table = run.reference_returns_from_config(cfg, str(tmp_path))
    assert "| hopper |" in table
    doc = json.load(open(tmp_path / reference.OUT_FILE))
    assert doc["format"] == "mdt_jax.v5_reference" and set(doc["tasks"]) == {"hopper"}
    assert {k: doc["tasks"]["hopper"]["expert"][k] for k in ("episodes", "seed")} == {"episodes": 100, "seed": 0}
    with pytest.raises(FileExistsError):
        run.reference_returns_from_config(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="config.episodes"):
        reference.measure(["hopper"], episodes=99)
    with pytest.raises(ValueError, match="config.tasks"):
        run.reference_returns_from_config(ml_collections.ConfigDict(dict(cfg) | {"tasks": "ant"}),
                                                str(tmp_path / "x"))
