"""The matmul FLOPs of a whole study, stage by stage, from its config, and what they cost in time at
a given sustained rate: is the paper's scale (configs/paper.py) a 10-minute job on one accelerator?

    python benchmarks/study_flops.py [--shapes paper|cpu|quickstart] [--rate TFLOPS ...] [--json PATH]

Counted from the config exactly as `mdt_jax.reproduce` runs it (the same seeds, tasks, sets, grids
and episode counts), with `benchmarks/study.py:step_flops` for a training step (forward x 3) and
`benchmarks/evaluate.py:analytic_flops(cfg, 'last')` for one policy step of an evaluation:

- training: the single-task sets (independent, common, pretrained) and the large set, S seeds x T
  tasks each, `train.num_steps` steps at `train.train.batch_size`; the pretrained trunk (one
  multi-task DT of the single-task shape, `pretrain.num_steps`, T x `pretrain.batch_size` rows);
  the multi-task DT per seed (`multi.num_steps`, T x `multi.batch_size` rows); its finetunes
  (S x T, `multi.finetune_steps` at the train batch size); the P1 finetunes (S x 2 methods x T,
  `p1_finetune.num_steps`). Frozen params are counted as trained (an upper bound: their weight
  gradients are skipped, the activation gradients are not);
- Fisher: every single-task model and every finetune, `fisher.num_batches` gradient batches;
  Grams (RegMean): the common and independent sets, forward only;
- evaluation: every candidate the study evaluates, on the episodes it evaluates it on, each
  episode counted at `eval.max_steps` (an upper bound: hopper and walker2d episodes end early):
  the unmerged models (own task), every P1 merge (every task), the P1 finetunes (own task),
  RegMean and the aligned average, the multi-task DT, the finetunes (every task), P2 average /
  Fisher / EMR, every P3 grid point on the report AND the selection episodes, the CMA-ES search's
  best (report episodes); the search itself (population x generations x `search.episodes` per
  task, selection episodes) is its own line;
- not counted: physics (MuJoCo / MJX), LayerNorms, softmax, data sampling, the optimiser.

The time columns divide the total by each `--rate` (sustained TFLOP/s, an assumption you choose:
H200's dense peaks are about 67 TFLOP/s float32 on the CUDA cores, 495 TF32 and 990 bfloat16 on
the tensor cores; models this small reach a fraction of them).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.evaluate import analytic_flops  # noqa: E402
from benchmarks.study import SHAPE_SETS, step_flops, study_config  # noqa: E402
from mdt_jax.fileio import write_json_atomic  # noqa: E402


def study_flops(which: str) -> dict:
    """{stage: FLOPs} of the study config `which` (module doc), plus the counts behind them."""
    from mdt_jax.reproduce import parse_seeds
    from mdt_jax.run import config_dict, model_config, split_list, task_dims

    c = study_config(which)
    tasks = split_list(c.tasks)
    S, T = len(parse_seeds(c.seeds)), len(tasks)
    dims = [task_dims(t) for t in tasks]
    Sd, Ad = max(d[0] for d in dims), max(d[1] for d in dims)
    base = config_dict(c.train.model)
    B = int(c.train.train.batch_size)
    single = model_config(base, Sd, Ad)
    large = model_config(base | config_dict(c.large), Sd, Ad) if len(c.large) else None
    multi_tasks = [(t, *task_dims(t)) for t in tasks]
    multi = model_config(base | config_dict(c.multi.model), 0, 0, tasks=multi_tasks)
    pc = c.get("pretrain", None)
    pretrained = pc is not None and pc.num_steps > 0
    trunk = model_config(base, 0, 0, tasks=multi_tasks)
    n_single_sets = 2 + int(pretrained)  # independent, common (+ pretrained): one shape
    steps = int(c.train.num_steps)
    out = {}
    out["train: single-task sets"] = n_single_sets * S * T * steps * step_flops(single, B)
    if large is not None:
        out["train: large set"] = S * T * steps * step_flops(large, B)
    if pretrained:
        out["train: pretrained trunk"] = pc.num_steps * step_flops(trunk, T * pc.batch_size)
    out["train: multi-task DT"] = S * c.multi.num_steps * step_flops(multi, T * c.multi.batch_size)
    out["train: finetunes"] = S * T * c.multi.finetune_steps * step_flops(multi, B)
    out["train: P1 finetunes"] = S * 2 * T * c.p1_finetune.num_steps * step_flops(single, B)
    nb, fb = int(c.fisher.num_batches), int(c.fisher.batch_size)
    n_models = (n_single_sets * S * T, S * T if large is not None else 0)
    out["fisher"] = (n_models[0] * step_flops(single, fb) + (n_models[1] * step_flops(large, fb) if large else 0)
                     + S * T * step_flops(multi, fb)) * nb
    out["gram"] = 2 * S * T * nb * step_flops(single, fb) / 3
    # evaluation: policy steps per candidate kind, every episode at max_steps
    E, steps_ep = int(c.eval.episodes), int(c.eval.max_steps)
    ep = E * steps_ep  # policy steps of one model on one task
    grids = (len(split_list(c.merge.lerp_ps)) + len(split_list(c.merge.ta_lams)) + len(split_list(c.merge.ties_ks))
             * max(1, len(split_list(c.merge.get("ties_lams", (1,))))) + len(split_list(c.merge.dare_ps)))
    f_single, f_multi = analytic_flops(single, "last"), analytic_flops(multi, "last")
    f_large = analytic_flops(large, "last") if large else 0
    n_sets_p1 = {"independent": 2, "common": 3} | ({"pretrained": 2} if pretrained else {})
    ev_single = sum(T * ep + v * T * ep for v in n_sets_p1.values())  # unmerged (own task) + merges (every task)
    ev_single += 2 * T * ep + 2 * T * ep + T * ep  # P1 finetunes, RegMean x 2, aligned average
    ev_large = (T * ep + 2 * T * ep) if large else 0
    ev_multi = T * ep + T * T * ep + T * ep + 2 * grids * T * ep + 3 * T * ep  # pre, finetunes, P2 avg, P3 (x2), P2 fisher/EMR/search best
    sc = c.get("search", None)
    ev_search = (sc.popsize * sc.generations * T * sc.episodes * steps_ep) if sc is not None and sc.generations else 0
    out["evaluate"] = S * (ev_single * f_single + ev_large * f_large + ev_multi * f_multi)
    out["search (CMA-ES episodes)"] = S * ev_search * f_multi
    counts = {"seeds": S, "tasks": T, "episodes": E, "max_steps": steps_ep, "p3_grid_points": grids,
              "policy_steps": S * (ev_single + ev_large + ev_multi + ev_search),
              "models_trained": n_single_sets * S * T + (S * T if large else 0) + int(pretrained) + S + S * T + 2 * S * T,
              "step_flops": {"single": step_flops(single, B), "large": step_flops(large, B) if large else None,
                             "multi": step_flops(multi, T * c.multi.batch_size)},
              "policy_step_flops": {"single": f_single, "large": f_large or None, "multi": f_multi}}
    return {"stages": out, "total": sum(out.values()), "counts": counts}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="paper", choices=SHAPE_SETS)
    p.add_argument("--rate", type=float, nargs="+", default=[50.0, 150.0, 400.0],
                   help="sustained TFLOP/s to convert FLOPs to time (assumptions, module doc)")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    if any(r <= 0 for r in a.rate):
        raise SystemExit(f"error: --rate: must be > 0, got {a.rate}")
    res = study_flops(a.shapes)
    head = f"{'stage':28s} {'PFLOP':>10s} " + " ".join(f"{f'min@{r:g}TF':>11s}" for r in a.rate)
    print(f"study {a.shapes}: {res['counts']['models_trained']} models trained, "
          f"{res['counts']['policy_steps']:,} policy steps evaluated (upper bound)")
    print(head)
    for name, f in list(res["stages"].items()) + [("total", res["total"])]:
        print(f"{name:28s} {f / 1e15:10.2f} " + " ".join(f"{f / (r * 1e12) / 60:11.1f}" for r in a.rate))
    if a.json:
        write_json_atomic(a.json, res | {"shapes": a.shapes, "minutes_at": {
            f"{r:g}": res["total"] / (r * 1e12) / 60 for r in a.rate}})


if __name__ == "__main__":
    main()
