"""Grouped training for the study's shapes: one model's train chunk alone against G same-shaped models
vmapped in one program (`mdt_jax.train.make_train_chunk(..., vmapped=True)`).

    python benchmarks/study.py [--shapes quickstart|cpu|paper] [--steps 10] [--repeats 3] [--group G]
                               [--json PATH]

The shapes come from the study's configs (configs/quickstart.py, configs/paper.py:cpu,
configs/paper.py), exactly as `mdt_jax.reproduce` builds them:

- single:   the single-task DTs (`config.train.model`, batch `config.train.train.batch_size`);
- large:    the capacity set (`config.large` over the same model);
- multi:    the multi-task DT (`config.multi.model`, shared trunk, per-task heads, the sum of
            per-task losses over `config.multi.batch_size` samples per task);
- multi_ft: its per-task finetunes (the multi-task shape on one task's batch, with P2's freeze,
            init_reg and no-decay settings).

G defaults to the number of same-shaped models a study trains: tasks x seeds for single, large and
multi_ft (each init set, independent / common / pretrained, is another such group), seeds for
multi. The grouped program is the one `mdt_jax.training.train_group` (the study's grouped
training) builds: its data layout and its per-member sampler (`training.group_sample`), vmapped by
`train.make_train_chunk`. Single-task models of different tasks share one shape by padding every
task to the widest state and action, the padded action dims masked out of the loss through
`batch['act_dim']`; model i trains on task i mod T.

The data are synthetic (tests/synth.py: a fixed nonlinear policy), segmented with the config's K
and max_ep_len. Both sides run the same `--steps` steps fused in one `lax.scan` call; warm times are
medians over `--repeats` calls, alone and grouped interleaved so both see the same machine load.
Cold is the first call (compile plus one chunk).

Printed per shape: ms/step alone, ms/step per model grouped (the grouped call's time / steps / G),
their ratio (> 1 means grouping is faster per model), a recommendation (group when the ratio is
above 1.05), and the FLOP floor fraction: the analytic matmul FLOPs of one training step
(`step_flops`) over the measured float32 matmul peak (`benchmarks/_common.py::matmul_peak`), divided
by the measured time per model step. `--json` writes, per shape, `speedup`, `floor_fraction`
({alone, grouped}), `cold_s` and `warm_s` ({alone, grouped}, whole calls) and the figures behind them;
at the top level, the common keys (`benchmarks/_common.py`) summed over the shapes: `warm_s`/`cold_s`
of the grouped calls, `speedup` = G x alone warm / grouped warm, `floor_fraction` = G x steps x the
floor / grouped warm, `speedup_vs_batched` null (the grouped call is ours).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from benchmarks._common import common_keys, common_line, matmul_peak  # noqa: E402
from mdt_jax import train as T  # noqa: E402
from mdt_jax.data import pad_to, segment_data, stack_segment_data  # noqa: E402
from mdt_jax.fileio import write_json_atomic  # noqa: E402
from mdt_jax.models import DTConfig  # noqa: E402
from mdt_jax.models.dt import param_shapes  # noqa: E402
from mdt_jax.training import group_sample  # noqa: E402
from synth import make_dataset  # noqa: E402

SHAPE_SETS = ("quickstart", "cpu", "paper")
KINDS = ("single", "large", "multi", "multi_ft")
GROUP_IF = 1.05  # recommend grouping when alone / grouped-per-model exceeds this


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str              # "<set>/<kind>"
    kind: str              # one of KINDS
    cfg: DTConfig
    tcfg: T.TrainConfig
    tasks: tuple[str, ...]
    group: int             # G: same-shaped models trained together


def study_config(which: str):
    """The study config of a shape set: quickstart, paper:cpu or paper."""
    from configs import paper, quickstart

    if which == "quickstart":
        return quickstart.get_config()
    if which == "cpu":
        return paper.get_config("cpu")
    if which == "paper":
        return paper.get_config("")
    raise ValueError(f"--shapes: unknown shape set {which!r}; choose one of {SHAPE_SETS}")


def study_shapes(which: str, group: int = 0) -> list[Shape]:
    """The four trained shapes of a study config (module doc), with G = `group` if > 0."""
    from mdt_jax.pipelines import P2_FINETUNE
    from mdt_jax.reproduce import parse_seeds
    from mdt_jax.run import config_dict, model_config, split_list, task_dims, train_config

    if not isinstance(group, int) or group < 0:
        raise ValueError(f"--group: must be an int >= 0 (0: the study's own count), got {group!r}")
    c = study_config(which)
    tasks = tuple(split_list(c.tasks))
    n_seeds = len(parse_seeds(c.seeds))
    dims = [task_dims(t) for t in tasks]
    S, A = max(d[0] for d in dims), max(d[1] for d in dims)
    base = config_dict(c.train.model)
    tr = config_dict(c.train.train)
    multi_model = base | config_dict(c.multi.model)
    multi_tasks = [(t, *task_dims(t)) for t in tasks]
    ft_train = tr | {k: ",".join(v) if isinstance(v, tuple) else v for k, v in P2_FINETUNE.items()} \
        | config_dict(c.multi.finetune_train)
    per_model = group or len(tasks) * n_seeds
    out = [Shape(f"{which}/single", "single", model_config(base, S, A), train_config(tr), tasks, per_model)]
    if len(c.large):
        out.append(Shape(f"{which}/large", "large", model_config(base | config_dict(c.large), S, A), train_config(tr),
                         tasks, per_model))
    out.append(Shape(f"{which}/multi", "multi", model_config(multi_model, 0, 0, tasks=multi_tasks),
                     train_config(tr | {"batch_size": c.multi.batch_size}), tasks, group or n_seeds))
    out.append(Shape(f"{which}/multi_ft", "multi_ft", model_config(multi_model, 0, 0, tasks=multi_tasks),
                     train_config(ft_train), tasks, per_model))
    return out


def step_flops(cfg: DTConfig, rows: int) -> float:
    """Matmul FLOPs of one training step on `rows` segments (forward x 3: the backward pass costs
    twice the forward's matmuls). Forward, T = 3K tokens, hidden H, MLP width I:

    - every block but the last: 2 R T (3H^2 + H^2 + 2 H I) + 4 R T^2 H (scores and weighted values);
    - the last block, which runs its queries only at the K state tokens (`DecisionTransformer`,
      outputs='action'): 2 R (K H^2 + T 2H^2) + 4 R K T H + 2 R K (H^2 + 2 H I);
    - embeddings and the action head, per task io (a multi-task DT runs every task's on every
      row): 2 R K H (1 + S_t + A_t) + 2 R K H A_t.
    Attention is counted in full (no causal skipping); LayerNorms, softmax and the gathers are not
    matmuls.
    """
    K, H, I, L = cfg.context_len, cfg.hidden_size, cfg.inner_dim, cfg.n_layer
    T_ = 3 * K
    R = rows
    block = 2 * R * T_ * (4 * H * H + 2 * H * I) + 4 * R * T_ * T_ * H
    last = 2 * R * (K * H * H + T_ * 2 * H * H) + 4 * R * K * T_ * H + 2 * R * K * (H * H + 2 * H * I)
    ios = [(t.state_dim, t.act_dim) for t in cfg.tasks] if cfg.multi else [(cfg.state_dim, cfg.act_dim)]
    io = sum(2 * R * K * H * (1 + s + a) + 2 * R * K * H * a for s, a in ios)
    return 3.0 * ((L - 1) * block + last + io)


def _task_data(task: str, cfg: DTConfig, seed: int):
    from mdt_jax.run import task_dims

    s, a = task_dims(task)
    K = cfg.context_len
    ds = make_dataset(n_traj=24, state_dim=s, act_dim=a, seed=seed, min_len=K, max_len=max(4 * K, 60))
    return segment_data(ds, context_len=K, max_ep_len=cfg.max_ep_len)


def synthetic_params(cfg: DTConfig, seed: int) -> dict:
    """Params of the model's shapes drawn in NumPy: kernels and embeddings N(0, 0.02), LayerNorm
    scales 1, biases 0. The timing does not depend on the values, and flax's own init compiles for
    seconds per shape on a CPU (eagerly or jitted), which would dwarf a short benchmark."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        if name == "bias":
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def make_problems(shape: Shape):
    """((chunk, state, data) alone, (chunk, state, data) grouped, rows per model step).

    The G models' states and data are built once, stacked; the model alone is member 0 of both
    (the same init and data as in the group)."""
    cfg, tcfg, B = shape.cfg, shape.tcfg, shape.tcfg.batch_size
    G, nt = shape.group, len(shape.tasks)
    widest = jax.jit(lambda ds: stack_segment_data([pad_to(d, cfg.state_dim, cfg.act_dim) for d in ds]))
    if shape.kind in ("single", "large"):
        from mdt_jax.run import task_dims
        data = (widest([_task_data(shape.tasks[i % nt], cfg, i) for i in range(G)]),
                jnp.asarray([task_dims(shape.tasks[i % nt])[1] for i in range(G)], jnp.int32))
        sample = group_sample("single_task", B)
        rows = B
    elif shape.kind == "multi":
        # every member gets the same synthetic data (the content does not change the work)
        one = jax.jit(stack_segment_data)([_task_data(t, cfg, j) for j, t in enumerate(shape.tasks)])
        data = jax.tree.map(lambda x: jnp.broadcast_to(x, (G,) + x.shape), one)
        sample = group_sample("multi_task", B)
        rows = nt * B
    elif shape.kind == "multi_ft":
        data = (widest([_task_data(shape.tasks[i % nt], cfg, i) for i in range(G)]),
                jnp.asarray([i % nt for i in range(G)], jnp.int32))
        sample = group_sample("multi_task_finetune", B)
        rows = B
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; known: {KINDS}")
    states = _stack([T.init_state(cfg, tcfg, jax.random.key(i), params=synthetic_params(cfg, i)) for i in range(G)])
    first = jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree))
    alone = (T.make_train_chunk(cfg, tcfg, sample), first(states), first(data))
    grouped = (T.make_train_chunk(cfg, tcfg, sample, vmapped=True), states, data)
    return alone, grouped, rows


class _Runner:
    """Times calls of one chunk on its (donated) state."""

    def __init__(self, problem, steps: int):
        self.chunk, self.state, self.data = problem
        self.steps = steps
        self.cold_s = self._call()
        self.warm = []

    def _call(self) -> float:
        t = time.perf_counter()
        self.state, m = self.chunk(self.state, self.data, self.steps)
        loss = np.asarray(jax.device_get(m["loss"]))
        dt = time.perf_counter() - t
        if not np.all(np.isfinite(loss)):
            raise FloatingPointError(f"training loss became {loss}")
        return dt

    def time(self):
        self.warm.append(self._call())


def bench(shape: Shape, steps: int, repeats: int, peak_gflops: float) -> dict:
    if steps <= 0 or repeats <= 0:
        raise ValueError(f"--steps and --repeats must be positive, got {steps}, {repeats}")
    p_alone, p_grouped, rows = make_problems(shape)
    alone = _Runner(p_alone, steps)
    grouped = _Runner(p_grouped, steps)
    for _ in range(repeats):
        alone.time()
        grouped.time()
    G = shape.group
    wa, wg = statistics.median(alone.warm), statistics.median(grouped.warm)
    ms_alone = 1e3 * wa / steps
    ms_grouped = 1e3 * wg / steps / G
    flops = step_flops(shape.cfg, rows)
    floor_ms = 1e3 * flops / (peak_gflops * 1e9)
    ratio = ms_alone / ms_grouped
    return {"group": G, "steps": steps, "repeats": repeats, "ms_per_step_alone": ms_alone,
            "ms_per_step_grouped_per_model": ms_grouped, "speedup": ratio,
            "recommend": "group" if ratio > GROUP_IF else "alone",
            "gflop_per_step": flops / 1e9, "floor_ms": floor_ms,
            "floor_fraction": {"alone": floor_ms / ms_alone, "grouped": floor_ms / ms_grouped},
            "cold_s": {"alone": alone.cold_s, "grouped": grouped.cold_s},
            "warm_s": {"alone": wa, "grouped": wg},
            "warm_s_all": {"alone": alone.warm, "grouped": grouped.warm},
            "model": {"hidden_size": shape.cfg.hidden_size, "n_layer": shape.cfg.n_layer,
                      "n_head": shape.cfg.n_head, "context_len": shape.cfg.context_len,
                      "batch_size": shape.tcfg.batch_size, "rows": rows,
                      "tasks": list(shape.cfg.task_names) if shape.cfg.multi else None}}


def peak() -> float:
    """The float32 matmul peak: 2048^3 on CPU, 8192^3 on an accelerator (2048 leaves it idle)."""
    return matmul_peak(n=2048 if jax.default_backend() == "cpu" else 8192)


def run(which: str, steps: int, repeats: int, group: int = 0, kinds=KINDS, log=print) -> dict:
    shapes = [s for s in study_shapes(which, group) if s.kind in kinds]
    p = peak()
    out = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "peak_gflops": p,
           "shapes_set": which, "steps": steps, "repeats": repeats, "shapes": {}}
    log(f"{jax.default_backend()} ({out['device']}); float32 matmul peak {p:.0f} GFLOP/s; {steps} steps per call, "
        f"median of {repeats}")
    log(f"{'shape':20} {'G':>3} {'ms alone':>9} {'ms/model G':>11} {'ratio':>6} {'advice':>6} {'floor a/g':>11} "
        f"{'cold s a/g':>12} {'warm s a/g':>12}")
    for s in shapes:
        r = bench(s, steps, repeats, p)
        out["shapes"][s.name] = r
        f, c, w = r["floor_fraction"], r["cold_s"], r["warm_s"]
        log(f"{s.name:20} {s.group:3d} {r['ms_per_step_alone']:9.2f} {r['ms_per_step_grouped_per_model']:11.2f} "
            f"{r['speedup']:5.2f}x {r['recommend']:>6} {f['alone']:5.2f}/{f['grouped']:<5.2f} "
            f"{c['alone']:5.1f}/{c['grouped']:<6.1f} {w['alone']:5.2f}/{w['grouped']:<6.2f}")
    rows = list(out["shapes"].values())
    if rows:  # ours = every shape's G models grouped; the peer = the same G models one at a time
        out |= common_keys(warm_s=sum(r["warm_s"]["grouped"] for r in rows),
                           cold_s=sum(r["cold_s"]["grouped"] for r in rows),
                           peer_s=sum(r["group"] * r["warm_s"]["alone"] for r in rows),
                           floor_s=sum(r["group"] * r["steps"] * r["floor_ms"] for r in rows) / 1e3)
        log(f"all shapes, grouped (ours) against alone x G: {common_line(out)}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=SHAPE_SETS, default="quickstart")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed call (small: CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group", type=int, default=0, help="G for every shape (0: the study's own count)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {KINDS}")
    ap.add_argument("--json", default=None, help="write the figures here (refused if the file exists)")
    args = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = sorted(set(kinds) - set(KINDS))
    if bad or not kinds:
        ap.error(f"--kinds: unknown {bad}; choose from {KINDS}")
    if args.steps <= 0 or args.repeats <= 0:
        ap.error("--steps and --repeats must be positive")
    if args.group < 0:
        ap.error("--group must be >= 0")
    if args.json and os.path.exists(args.json):
        ap.error(f"--json: {args.json} exists; give a new path")
    out = run(args.shapes, args.steps, args.repeats, args.group, kinds)
    if args.json:
        write_json_atomic(args.json, out, overwrite=False)
    return out


if __name__ == "__main__":
    main()
