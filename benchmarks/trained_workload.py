"""A workload of trained DTs for the evaluation benchmark, in a form transformers can also run.

    python benchmarks/trained_workload.py --workdir runs/bench_trained [--steps 4000]
                                          [--tasks hopper,halfcheetah,walker2d] [--quality expert]
                                          [--transitions 200000]
    python benchmarks/evaluate.py --models runs/bench_trained ...

Random-weight DTs end hopper and walker2d episodes within tens of steps, so the evaluation
benchmark's random workload is nearly all halfcheetah. Real evaluations run trained DTs, whose
episodes run long on every task. This script makes such a workload with the project's own
pipeline: per task, a dataset collected by the committed SAC behaviour policy of `--quality`
(`mdt_jax.behaviour.datasets.collect_dataset`, `--transitions` transitions), and an H128 L3 K20
1-head relu DT trained on it for `--steps` steps (`mdt_jax.training.train_run`: AdamW 1e-4, batch
64, a 500-step warmup so that the short run learns) with the timestep embedding added before
embed_ln (`timestep_embedding='before_ln'`, the original DT's and transformers' order), so that
`export_hf` can load the very same weights into transformers' DecisionTransformerModel and both
peers of `benchmarks/evaluate.py` run on them. The models land in WORKDIR/<task>/model
(`evaluate.py --models WORKDIR` finds them). Run again, it reuses what exists (both stages
resume).

These are benchmark fixtures, not results: the short training is only meant to make episodes
long. Their returns are printed by evaluate.py with the timings.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mdt_jax import envs  # noqa: E402
from mdt_jax.behaviour.datasets import QUALITIES, collect_dataset  # noqa: E402
from mdt_jax.training import TrainRun, train_run  # noqa: E402

MODEL = {"hidden_size": 128, "n_layer": 3, "n_head": 1, "context_len": 20, "activation": "relu",
         "timestep_embedding": "before_ln"}


def make(workdir: str, tasks, *, steps: int = 4000, quality: str = "expert", transitions: int = 200_000,
         seed: int = 0) -> dict[str, str]:
    """{task: model folder}: each task's dataset collected and its DT trained under `workdir`."""
    out = {}
    for task in tasks:
        data = collect_dataset(task, quality, transitions, os.path.join(workdir, "data", f"{task}-{quality}.hdf5"),
                               seed=seed)
        run = TrainRun(task=(task,), dataset=(data,), seed=seed, num_steps=steps, checkpoint_every=steps,
                       model=MODEL, train={"warmup_steps": 500})
        out[task] = train_run(run, os.path.join(workdir, task))
    return out


def main(argv=None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--tasks", default=",".join(envs.TASKS))
    ap.add_argument("--steps", type=int, default=4000, help="training steps per DT")
    ap.add_argument("--quality", default="expert", choices=QUALITIES)
    ap.add_argument("--transitions", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    if unknown := set(tasks) - set(envs.TASKS):
        ap.error(f"--tasks: unknown {sorted(unknown)}; choose from {list(envs.TASKS)}")
    if min(args.steps, args.transitions) < 1:
        ap.error("--steps and --transitions must be >= 1")
    models = make(args.workdir, tasks, steps=args.steps, quality=args.quality, transitions=args.transitions,
                  seed=args.seed)
    for task, path in models.items():
        print(f"{task}: {path}")
    return models


if __name__ == "__main__":
    main()
