"""A whole study with its seeds side by side (evaluations batched across seeds) against one seed
after the other, from the same config, each in a fresh workdir (cold compile cache).

    python benchmarks/study_seeds.py --config=configs/quickstart.py --workdir=DIR
                                     [--modes together,alone] [--json PATH] [-- --config.FIELD=VALUE ...]

Arguments after `--` override the config's fields, as on `launch.reproduce`'s command line (e.g.
`--config=tests/tiny_study.py -- --config.seeds=0,1 --config.eval.select_seeds=1000,1001`).

Each mode is `mdt_jax.reproduce.reproduce(config, DIR/<mode>, seeds_together=...)` in its own
process, one after the other: "together" is what `python -m launch.reproduce` does with grouping
on (the seeds' stages in lockstep, every pending evaluation of all seeds in one `evaluate` call
per compatible group); "alone" runs seed after seed, each evaluation its own call (the study
before this batching). Printed: each mode's wall time, their ratio, and whether the two
results.json are identical once each workdir's path is replaced by one token (they must be: a
candidate's rows do not depend on what it is batched with). A mode whose DIR/<mode>/results.json
already exists is not rerun (its recorded time is reused), so modes can be run in two commands.

`--json` has per mode `wall_s`, and the common keys (`benchmarks/_common.py`): `warm_s` = cold_s =
the together run's wall time (a whole study, compilation included), `speedup` = alone / together,
`speedup_vs_batched` and `floor_fraction` null; `identical`: the results.json comparison (null
when a mode is missing).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._common import common_keys, common_line  # noqa: E402

MODES = {"together": True, "alone": False}
CHILD = ("import sys; from ml_collections import config_flags; from absl import flags; "
         "from mdt_jax import reproduce as R; "
         "config_flags.DEFINE_config_file('config'); flags.FLAGS(['x', '--config=' + sys.argv[1], *sys.argv[4:]]); "
         "R.reproduce(flags.FLAGS.config, sys.argv[2], seeds_together=sys.argv[3] == 'together')")


def _record(workdir: str, mode: str) -> str:
    """Where a mode's wall time is recorded: DIR/<mode>_wall_s.json, beside DIR/<mode>/."""
    return os.path.join(workdir, f"{mode}_wall_s.json")


def recorded(workdir: str, mode: str) -> float | None:
    """The wall seconds recorded for a finished mode (`_record`, with DIR/<mode>/results.json)."""
    rec = _record(workdir, mode)
    if not (os.path.exists(os.path.join(workdir, mode, "results.json")) and os.path.exists(rec)):
        return None
    with open(rec) as f:
        return float(json.load(f)["wall_s"])


def run_mode(config: str, workdir: str, mode: str, overrides: list[str] = ()) -> float:
    """Wall seconds of one mode's study, run unless `recorded`."""
    if (wall := recorded(workdir, mode)) is not None:
        return wall
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, config, os.path.join(workdir, mode), mode, *overrides], cwd=ROOT,
                   check=True)
    wall = time.perf_counter() - t
    with open(_record(workdir, mode), "w") as f:
        json.dump({"wall_s": wall}, f)
    return wall


def results_text(workdir: str, mode: str) -> str | None:
    path = os.path.join(workdir, mode, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().replace(os.path.abspath(os.path.join(workdir, mode)), "<workdir>")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--modes", default="together,alone")
    ap.add_argument("--json", default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if any(not o.startswith("--config.") for o in overrides):
        ap.error(f"after --: only --config.FIELD=VALUE overrides, got {overrides}")
    modes = a.modes.split(",")
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes: a comma list of {sorted(MODES)}, got {a.modes!r}")
    os.makedirs(a.workdir, exist_ok=True)
    wall = {m: run_mode(a.config, a.workdir, m, overrides) for m in modes}
    for m in MODES:  # a mode run by an earlier command
        if m not in wall and (w := recorded(a.workdir, m)) is not None:
            wall[m] = w
    texts = {m: results_text(a.workdir, m) for m in MODES}
    identical = None if None in texts.values() else texts["together"] == texts["alone"]
    for m, s in wall.items():
        print(f"{m:9s} {s:8.1f} s wall")
    out = {"modes": {m: {"wall_s": s} for m, s in wall.items()}, "identical": identical, "config": a.config,
           "overrides": overrides}
    if "together" in wall:
        out |= common_keys(warm_s=wall["together"], cold_s=wall["together"], peer_s=wall.get("alone"))
        print(common_line(out))
    print(f"results.json identical: {identical}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
