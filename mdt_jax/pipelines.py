"""The paper's merging pipelines as library functions over in-memory models.

- **P1** (`p1_merge`): single-task DTs (independent inits or one common init) have the attn and mlp
  of their blocks merged (average, Fisher or RegMean), optionally after permutation alignment
  (`align`). Each task keeps its own embeddings, LayerNorms and heads; the merged part is then
  frozen (`P1_FREEZE`) and the rest finetuned per task.
- **P2** (`p2_merge`): copies of a multi-task DT finetuned one per task (ln_f and the timestep
  embedding frozen, init_reg, `P2_FINETUNE`) have their trunks merged (average, Fisher or RegMean) and
  each task's own heads copied in from its finetune.
- **P3** (`p3_candidates`): grids between pre- and post-finetuning weights: lerp(p, pre, merged),
  task arithmetic (lambda), TIES (k, lambda) and DARE (p) with the multi-task model as the base.
  Every grid comes back stacked on a leading axis, ready for one batched evaluation call.

These functions only merge. The stages below them (`merge_stage`: `run_p1`, `run_p2`, `run_p3`)
run a pipeline over saved models from a typed `MergeSpec`: they load, merge, save, evaluate
(`evaluate.Row`s) and cache each step in the workdir, so a killed run resumes. They are generators
of their evaluation requests (`evaluate.EvalRequest`), driven by `evaluate.run_lockstep`, so that
`merge_stages` (and the study, over seeds) puts the same evaluation of several stages into one
batched call.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import checkpoint, evaluate as ev, fileio, merge as M, trees
from mdt_jax.models.dt import DTConfig

P1_SUBSET = "attn,mlp"
P1_FREEZE = ("attn", "mlp")                     # the merged part stays fixed while the rest finetunes
P2_SUBSET = "blocks"
# the reference's P2 finetune command: ln_f and the timestep embedding frozen, init_reg 1e-4 on the
# blocks, and `--custom_transformer_decay`: no weight decay on the GPT-2 trunk, AdamW eps 1e-6
P2_FINETUNE = dict(freeze=("ln_f", "timestep"), init_reg=1e-4, init_reg_on=("blocks",), no_decay=("blocks", "ln_f"),
                   adam_eps=1e-6)


def trunk(params) -> dict:
    """The shared-shape part of a DT: its blocks (same shapes across tasks of equal H and depth)."""
    return {k: v for k, v in params.items() if k.startswith("block_")}


def p1_merge(models: Sequence[dict], method: str = "average", fishers: Sequence[dict] | None = None, *,
             grams: Sequence[dict] | None = None, subset: str = P1_SUBSET, names: Sequence[str] | None = None,
             align: bool = False, cfgs: Sequence[DTConfig] | None = None, align_seed: int = 0,
             **coeffs) -> list[dict]:
    """Merge `subset` of the blocks of single-task DTs; returns each task's params with it inserted.

    `models` may differ in state/action dims (their embeddings and heads are never merged).
    `fishers` are per-model Fisher trees (at least over the blocks) for method='fisher'; `grams`
    per-model Gram trees (`mdt_jax.regmean.Grams.gram`) for method='regmean'.
    `align`: first permute every model onto model 0 by weight matching (`mdt_jax.align`, Git
    Re-Basin), each one computing the same function; its own embeddings, LayerNorms and heads take
    the residual permutation, and its Fisher the same permutations. Needs `cfgs` (one per model).
    """
    if align:
        from mdt_jax import align as A
        if cfgs is None or len(cfgs) != len(models):
            raise ValueError("p1_merge: align=True needs cfgs, one DTConfig per model")
        models, perms = A.align(list(cfgs), models, seed=align_seed)
        if fishers is not None:
            fishers = [A.permute(c, f, p) for c, f, p in zip(cfgs, fishers, perms)]
    stacked = M.stack([trunk(p) for p in models], names)
    fs = None if fishers is None else M.stack([trunk(f) for f in fishers], names)
    gs = None if grams is None else M.stack([trunk(g) for g in grams], names)
    merged = M.merge(method, stacked, fishers=fs, grams=gs, subset=subset, **coeffs)
    mask = M.subset_mask(merged, subset)
    out = []
    for p in models:
        own = trunk(p)
        blocks = trees.where(mask, merged, own)
        out.append(p | blocks)
    return out


def heads_of(params, task: str) -> dict:
    return {f"task_{task}": params[f"task_{task}"]}


def p2_merge(cfg: DTConfig, finetuned: Sequence[dict], method: str = "average",
             fishers: Sequence[dict] | None = None, *, grams: Sequence[dict] | None = None,
             subset: str = P2_SUBSET, **coeffs) -> dict:
    """One multi-task model: the finetunes' trunks merged, task t's heads from finetune t.

    `finetuned[t]` is the multi-task model finetuned on task `cfg.tasks[t]`. Shared leaves outside
    `subset` (the frozen ln_f and timestep embedding) come from finetune 0. `grams[t]` (regmean):
    finetune t's Gram tree, ideally on its own task's data.
    """
    if not cfg.multi:
        raise ValueError("P2 merges multi-task models; cfg has no tasks")
    if len(finetuned) != len(cfg.tasks):
        raise ValueError(f"P2 needs one finetune per task ({len(cfg.tasks)}), got {len(finetuned)}")
    names = [f"finetune[{t}]" for t in cfg.task_names]
    stacked = M.stack(finetuned, names)
    fs = None if fishers is None else M.stack(fishers, names)
    gs = None if grams is None else M.stack(grams, names)
    merged = M.merge(method, stacked, fishers=fs, grams=gs, subset=subset, **coeffs)
    for t, name in enumerate(cfg.task_names):
        merged = merged | heads_of(finetuned[t], name)
    return merged


def p3_candidates(cfg: DTConfig, pre: dict, finetuned: Sequence[dict], merged: dict, *, lerp_ps=(),
                  ta_lams=(), ties_ks=(), ties_lams=(1.0,), dare_ps=(), dare_lam: float = 1.0,
                  rng: jax.Array | None = None, subset: str = P2_SUBSET) -> dict[str, tuple[dict, list[dict]]]:
    """Candidate grids, each `(stacked params, [coefficients per candidate])`, one vmapped merge each.

    - lerp: pre + p (merged - pre) on `subset` (heads from the merged model);
    - task_arithmetic: pre + lam * sum_t (finetune_t - pre) on `subset`;
    - ties: TIES over the finetunes' trunk task vectors for every (k, lam);
    - dare_ta: DARE(p) then task arithmetic with `dare_lam`.
    Each task's heads come from its own finetune in every task-vector candidate.
    """
    stacked = M.stack(finetuned)
    heads = {}
    for t, name in enumerate(cfg.task_names):
        heads |= heads_of(finetuned[t], name)

    def with_heads(cands):
        n = jax.tree.leaves(cands)[0].shape[0]
        return cands | jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), heads)

    grids: dict[str, tuple[dict, list[dict]]] = {}
    if lerp_ps:
        ps = jnp.asarray(lerp_ps, jnp.float32)
        base = merged | {k: v for k, v in pre.items() if not k.startswith("task_")}
        grids["lerp"] = (jax.vmap(lambda p: M.lerp(base, merged, p, subset=subset))(ps),
                         [{"p": float(p)} for p in lerp_ps])
    if ta_lams:
        lams = jnp.asarray(ta_lams, jnp.float32)
        cands = jax.vmap(lambda lam: M.task_arithmetic(pre, stacked, lam, subset=subset))(lams)
        grids["task_arithmetic"] = (with_heads(cands), [{"lam": float(x)} for x in ta_lams])
    if ties_ks:
        # k stays a Python float (the kept count is computed in float64, as the original TIES
        # code does); the lambdas of one k are one vmapped merge
        lams = jnp.asarray(ties_lams, jnp.float32)
        per_k = [jax.vmap(lambda lam: M.ties(pre, stacked, float(k), lam, subset=subset))(lams) for k in ties_ks]
        cands = jax.tree.map(lambda *xs: jnp.concatenate(xs), *per_k)
        grids["ties"] = (with_heads(cands), [{"k": float(k), "lam": float(lam)} for k in ties_ks for lam in ties_lams])
    if dare_ps:
        if rng is None:
            raise ValueError("DARE candidates need an rng key")
        ps = jnp.asarray(dare_ps, jnp.float32)
        cands = jax.vmap(lambda p: M.task_arithmetic(pre, M.dare(pre, stacked, p, rng, subset=subset), dare_lam,
                                                     subset=subset))(ps)
        grids["dare_ta"] = (with_heads(cands), [{"p": float(p), "lam": dare_lam} for p in dare_ps])
    return grids


# ----------------------------------------------------------------------------------------------
# Stages: the pipelines over saved models, evaluated, resumable. `merge_stage` is what
# `launch.merge` and the study run; it takes a typed `MergeSpec`, never a config.
# ----------------------------------------------------------------------------------------------

PIPELINES = ("p1", "p2", "p3")
STAGE_METHODS = ("average", "fisher", "regmean", "emr")


def _csv(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """One merge run (configs/merge.py's fields, typed; see that file for each field's meaning)."""

    pipeline: str = "p1"
    checkpoints: tuple[str, ...] = ()
    base: str = ""
    fishers: tuple[str, ...] = ()
    grams: tuple[str, ...] = ()
    method: str = "average"
    align: bool = False
    subset: str = ""
    weights: tuple[float, ...] = ()
    floor: float | None = None
    normalize_trace: bool = True
    trace_over: str = "fisher"
    regmean_alpha: float = 0.9
    lerp_ps: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    ta_lams: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    ties_ks: tuple[float, ...] = (0.1, 0.2, 0.5)
    ties_lams: tuple[float, ...] = (1.0,)
    dare_ps: tuple[float, ...] = (0.1, 0.3, 0.5)
    seed: int = 0
    select_seed: int = -1
    eval_inputs: bool = True
    eval: ev.EvalSpec = ev.EvalSpec()

    def __post_init__(self):
        for f in ("checkpoints", "fishers", "grams", "weights", "lerp_ps", "ta_lams", "ties_ks", "ties_lams",
                  "dare_ps"):
            if isinstance(getattr(self, f), str):
                raise TypeError(f"MergeSpec.{f}: a tuple, not a string (the CLI's comma-separated lists are split "
                                "by the adapter)")
        for f in ("checkpoints", "fishers", "grams"):
            object.__setattr__(self, f, tuple(str(p) for p in getattr(self, f)))
        for f in ("weights", "lerp_ps", "ta_lams", "ties_ks", "ties_lams", "dare_ps"):
            object.__setattr__(self, f, tuple(float(v) for v in getattr(self, f)))
        if self.pipeline not in PIPELINES:
            raise ValueError(f"config.pipeline: unknown {self.pipeline!r}; choose p1, p2 or p3")
        if self.method not in ("average", "fisher", "regmean") and not (self.method == "emr" and self.pipeline == "p2"):
            raise ValueError(f"config.method: unknown merge method {self.method!r} for {self.pipeline}; "
                             "choose average, fisher or regmean (task arithmetic, TIES and DARE run as P3 grids; "
                             "emr with pipeline p2)")
        if self.method == "emr" and not self.base:
            raise ValueError("config.base: method=emr needs the multi-task model before finetuning (the base)")
        if self.align and self.pipeline != "p1":
            raise ValueError(f"config.align: permutation alignment is for P1 (independent inits), not {self.pipeline}")
        if self.align and self.method == "regmean":
            raise ValueError("config.align: alignment with method=regmean would need the Grams permuted too; "
                             "compute the Grams of the aligned models instead")
        if len(self.checkpoints) < 2:
            raise ValueError(f"config.checkpoints: need at least 2 models to merge, got {len(self.checkpoints)}")
        if self.method == "regmean" and len(self.grams) != len(self.checkpoints):
            raise ValueError(f"config.grams: method=regmean needs one Gram folder (launch.gram) per checkpoint "
                             f"({len(self.checkpoints)}), got {len(self.grams)}")
        if self.method == "fisher" and len(self.fishers) != len(self.checkpoints):
            raise ValueError(f"config.fishers: method=fisher needs one Fisher per checkpoint ({len(self.checkpoints)}), "
                             f"got {len(self.fishers)}")
        if self.pipeline == "p3" and not self.base:
            raise ValueError("config.base: P3 needs the multi-task model before finetuning")
        if self.pipeline == "p3" and self.select_seed == self.seed:
            raise ValueError(f"config.select_seed: {self.select_seed} is the report seed (config.seed); selection "
                             "episodes must have reset seeds disjoint from the reported ones")

    def run_config(self) -> dict:
        """This run in configs/merge.py's layout (lists comma-separated), as the workdir records it."""
        d = dataclasses.asdict(self)
        for f in ("checkpoints", "fishers", "grams", "weights", "lerp_ps", "ta_lams", "ties_ks", "ties_lams", "dare_ps"):
            d[f] = _csv(d[f])
        return d

    def coefficients(self) -> dict:
        if self.method == "average":
            return {"weights": jnp.asarray(self.weights)} if self.weights else {}
        if self.method == "fisher":
            return {"floor": self.floor, "normalize_trace": self.normalize_trace, "trace_over": self.trace_over}
        if self.method == "regmean":
            return {"alpha": float(self.regmean_alpha)}
        return {}


@dataclasses.dataclass(frozen=True)
class MergeResult:
    rows: list          # [evaluate.Row]
    record: dict        # what was merged, how, and each P3 grid's best (merge.json's "merge")

    def to_json(self) -> dict:
        return {"merge": self.record, "rows": [r.to_dict() if isinstance(r, ev.Row) else r for r in self.rows]}


def cached_eval(folder: str, key: str, make_request):
    """The rows (as dicts) of the evaluation `make_request()` builds, computed once and kept at
    `folder/<key>.json`; a generator: when not cached, the request is yielded to the driver
    (`evaluate.run_lockstep`), which sends back its rows. `make_request` runs only then."""
    store = fileio.Store(folder, fileio.JSON, what="cached stage")
    out = store.get(key)
    if out is None:
        rows = yield make_request()
        out = [r.to_dict() for r in rows]
        store.put(key, out)
    return out


def _rows(workdir: str, key: str, request: ev.EvalRequest):
    """`request`'s rows once per workdir (`workdir/stages/<key>.json`, `cached_eval`), as Rows."""
    return [_row(d) for d in (yield from cached_eval(os.path.join(workdir, "stages"), key, lambda: request))]


def _row(d: dict) -> ev.Row:
    label = {"checkpoint_mode", "model", "checkpoint", "coefficients"}
    return ev.Row(d["model"], {k: v for k, v in d.items() if k not in label}, d.get("checkpoint_mode", "last"),
                  d.get("checkpoint"), d.get("coefficients"))


def merge_stage(spec: MergeSpec, workdir: str) -> MergeResult:
    """Load `spec`'s models, run its pipeline, save the merged checkpoints under `workdir`, evaluate
    them (and, with `eval_inputs`, the inputs) and write `workdir/merge.json`. Killed, the same call
    resumes: each evaluation is cached in `workdir/stages`, each checkpoint written once; a
    different spec on the same workdir is refused."""
    return ev.run_lockstep([merge_stage_steps(spec, workdir)])[0]


def merge_stages(specs: Sequence[MergeSpec], workdirs: Sequence[str]) -> list[MergeResult]:
    """`merge_stage` of each (spec, workdir), their evaluations batched: at each step every
    stage's pending request goes into one `evaluate` call per compatible group (e.g. the same
    pipeline over several seeds' models). The results are those of the stages run one by one."""
    if len(specs) != len(workdirs) or len(set(map(os.path.abspath, workdirs))) != len(workdirs):
        raise ValueError("merge_stages: one distinct workdir per spec")
    return ev.run_lockstep([merge_stage_steps(s, w) for s, w in zip(specs, workdirs)])


def merge_stage_steps(spec: MergeSpec, workdir: str):
    """`merge_stage` as a generator of its evaluation requests (`evaluate.run_lockstep`); returns
    the MergeResult."""
    from mdt_jax.fisher_stage import load_fishers
    from mdt_jax.fileio import run_config_guard

    if os.path.exists(os.path.join(workdir, "merge.json")):
        raise FileExistsError(f"{workdir} already holds a merge (merge.json); use a new --workdir")
    run_config_guard(workdir, spec.run_config())  # a killed run resumes; a different one is refused
    loaded = [checkpoint.load(p) for p in spec.checkpoints]
    fishers = load_fishers(list(spec.fishers)) if spec.method == "fisher" else None
    grams = None
    if spec.method == "regmean":
        from mdt_jax.regmean import load_grams
        grams = [load_grams(p)[0].gram for p in spec.grams]
    subset = spec.subset or (P1_SUBSET if spec.pipeline == "p1" else P2_SUBSET)
    coeffs = spec.coefficients()
    record = {"pipeline": spec.pipeline, "method": spec.method, "subset": subset, "models": list(spec.checkpoints),
              "align": spec.align, "fishers": list(spec.fishers) if fishers else [],
              "grams": list(spec.grams) if grams else [],
              "coefficients": {k: (np.asarray(v).tolist()) for k, v in coeffs.items()}}
    os.makedirs(workdir, exist_ok=True)
    run = run_p1 if spec.pipeline == "p1" else run_p2 if spec.pipeline == "p2" else run_p3
    rows = yield from run(spec, loaded, workdir, record, fishers=fishers, grams=grams, subset=subset, coeffs=coeffs)
    result = MergeResult(rows, record)
    fileio.write_json_atomic(os.path.join(workdir, "merge.json"), result.to_json())
    return result


def run_p1(spec: MergeSpec, loaded, workdir: str, record: dict, *, fishers, grams, subset: str, coeffs: dict
           ) -> list[ev.Row]:
    """P1 over single-task `loaded` models (`checkpoint.Model`s): one merged model per task, saved as
    `workdir/merged_<task>`, each evaluated (and, with `eval_inputs`, each unmerged input)."""
    if any(m.cfg.multi for m in loaded):
        raise ValueError("config.checkpoints: P1 merges single-task DTs; got a multi-task checkpoint")
    names = [m.metadata.get("task", "model") for m in loaded]
    names = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]  # e.g. two seeds of a task
    merged = p1_merge([m.params for m in loaded], spec.method, fishers, grams=grams, subset=subset, names=names,
                      align=spec.align, cfgs=[m.cfg for m in loaded], align_seed=spec.seed, **coeffs)
    record["merged_fraction"] = M.merged_fraction(trunk(loaded[0].params), subset)
    rows = []
    for m, name, params in zip(loaded, names, merged):
        out = checkpoint.save_once(os.path.join(workdir, f"merged_{name}"), params, m, m.metadata | {"merge": record})
        rows += yield from _rows(workdir, f"eval_p1_{name}", ev.EvalRequest(
            m, params, spec.eval, spec.seed, f"p1_{spec.method}[{name}]", checkpoint=out))
        if spec.eval_inputs:
            rows += yield from _rows(workdir, f"eval_unmerged_{name}", ev.EvalRequest(
                m, m.params, spec.eval, spec.seed, f"unmerged[{name}]"))
    return rows


def _finetunes(spec: MergeSpec, loaded, fishers, grams):
    """(the first finetune's Model, finetune params in task order, fishers and grams in that order)."""
    cfgs = {m.cfg for m in loaded}
    if len(cfgs) != 1 or not next(iter(cfgs)).multi:
        raise ValueError("config.checkpoints: P2/P3 merge per-task finetunes of one multi-task DT "
                         "(all with the same multi-task config)")
    cfg = cfgs.pop()
    by_task = {m.metadata.get("task"): m for m in loaded}
    if set(by_task) != set(cfg.task_names):
        raise ValueError(f"config.checkpoints: need one finetune per task {cfg.task_names}, got {sorted(map(str, by_task))}")
    tasks = [m.metadata.get("task") for m in loaded]
    reorder = lambda xs: None if xs is None else [xs[tasks.index(t)] for t in cfg.task_names]
    # every finetune of the model carries the normalisers of all its tasks
    return by_task[cfg.task_names[0]], [by_task[t].params for t in cfg.task_names], reorder(fishers), reorder(grams)


def _base(spec: MergeSpec, cfg: DTConfig) -> dict:
    base = checkpoint.load(spec.base)
    if base.cfg != cfg:
        raise ValueError(f"config.base: {spec.base} is not the model these finetunes came from (config differs)")
    return base.params


def run_p2(spec: MergeSpec, loaded, workdir: str, record: dict, *, fishers, grams, subset: str, coeffs: dict,
           merged_out: list | None = None) -> list[ev.Row]:
    """P2 over per-task finetunes of one multi-task DT: the trunks merged, each task's heads copied
    in, saved as `workdir/merged` and evaluated (EMR: `workdir/emr`, each task with its own model);
    with `eval_inputs`, each finetune evaluated too. `merged_out` receives the merged params."""
    first, order, fishers, grams = _finetunes(spec, loaded, fishers, grams)
    cfg = first.cfg
    rows = []
    meta_out = {k: first.metadata[k] for k in ("tasks",) if k in first.metadata}
    if spec.method == "emr":  # one unified trunk task vector; task t runs base + lambda_t M_t tau_uni
        rows += _run_emr(spec, workdir, first, order, record, subset)  # each task its own model: not batched
        merged = None
    else:
        merged = p2_merge(cfg, order, spec.method, fishers, grams=grams, subset=subset, **coeffs)
        record["merged_fraction"] = M.merged_fraction(merged, subset)
        out = checkpoint.save_once(os.path.join(workdir, "merged"), merged, first,
                                   meta_out | {"kind": "multi_task_merged", "merge": record})
        rows += yield from _rows(workdir, "eval_p2", ev.EvalRequest(
            first, merged, spec.eval, spec.seed, f"p2_{spec.method}", checkpoint=out))
    for t, p in zip(cfg.task_names, order if spec.eval_inputs else ()):
        rows += yield from _rows(workdir, f"eval_finetune_{t}", ev.EvalRequest(
            first, p, spec.eval, spec.seed, f"finetune_{t}"))
    if merged_out is not None:
        merged_out += [first, order, merged, meta_out | {"kind": "multi_task_merged"}]
    return rows


def _run_emr(spec: MergeSpec, workdir: str, first, order: list, record: dict, subset: str) -> list[ev.Row]:
    """EMR-Merging (`mdt_jax.emr`): elect against `spec.base`, save WORKDIR/emr (the unified vector,
    masks, rescalers and the base's path), evaluate each task with its own model."""
    from mdt_jax import emr as E

    cfg = first.cfg
    base = _base(spec, cfg)
    names = [f"finetune[{t}]" for t in cfg.task_names]
    emr = E.emr_elect(base, M.stack(order, names), subset=subset, names=names)
    record |= {"base": os.path.abspath(spec.base), "rescalers": np.asarray(emr.rescalers).tolist(),
               "merged_fraction": M.merged_fraction(base, subset)}
    meta_out = {k: first.metadata[k] for k in ("tasks",) if k in first.metadata} | {
        "kind": "multi_task_emr", "merge": record, "norms": {t: n.to_dict() for t, n in first.norms.items()}}
    out = os.path.join(workdir, "emr")
    if not os.path.exists(os.path.join(out, E.META_FILE)):
        E.save_emr(out, emr, base=spec.base, config=cfg, names=list(cfg.task_names), subset=subset,
                   metadata=meta_out)
    stats = ev.model_stats(first, cfg.task_names)
    out_rows = fileio.cached_json(os.path.join(workdir, "stages", "eval_p2_emr.json"), lambda: E.evaluate_task_models(
        cfg, E.emr_stack(base, emr), stats, episodes=spec.eval.episodes, max_steps=spec.eval.max_steps,
        seed=spec.seed, executor=spec.eval.executor, extra={"model": "p2_emr", "checkpoint": out}))
    return [_row(d) for d in out_rows]


def run_p3(spec: MergeSpec, loaded, workdir: str, record: dict, *, fishers, grams, subset: str, coeffs: dict
           ) -> list[ev.Row]:
    """P2, then P3's grids between the multi-task model (`spec.base`) and the finetunes: each grid
    evaluated as one batched call; each grid's best chosen on the selection episodes
    (`spec.select_seed`; -1: the reported ones, optimistic), reported on `spec.seed`'s, and saved
    as `workdir/p3_<grid>_best`."""
    parts: list = []
    rows = yield from run_p2(spec, loaded, workdir, record, fishers=fishers, grams=grams, subset=subset,
                             coeffs=coeffs, merged_out=parts)
    first, order, merged, meta_out = parts
    cfg = first.cfg
    pre = _base(spec, cfg)
    if spec.eval_inputs:
        rows += yield from _rows(workdir, "eval_pre", ev.EvalRequest(first, pre, spec.eval, spec.seed, "pre"))
    grids = p3_candidates(cfg, pre, order, merged, lerp_ps=spec.lerp_ps, ta_lams=spec.ta_lams, ties_ks=spec.ties_ks,
                          ties_lams=spec.ties_lams, dare_ps=spec.dare_ps, rng=jax.random.key(spec.seed),
                          subset=subset)
    record["p3_best"] = {}
    for name, (cands, grid) in grids.items():
        grid_rows = yield from _rows(workdir, f"eval_p3_{name}", ev.EvalRequest(
            first, cands, spec.eval, spec.seed, f"p3_{name}", stacked_coeffs=grid))
        rows += grid_rows
        chosen_on = grid_rows
        if spec.select_seed >= 0:  # choose on held-out selection episodes, report on spec.seed's
            chosen_on = yield from _rows(workdir, f"select_p3_{name}", ev.EvalRequest(
                first, cands, spec.eval, spec.select_seed, f"p3_{name}", stacked_coeffs=grid))
        means = [np.mean([r.summary["normalized"] for r in chosen_on if r.coefficients == c]) for c in grid]
        best = int(np.argmax(means))
        report = np.mean([r.summary["normalized"] for r in grid_rows if r.coefficients == grid[best]])
        record["p3_best"][name] = {"coefficients": grid[best], "selection_normalized_mean": float(means[best]),
                                   "report_normalized_mean": float(report),
                                   "chosen_on_seed": spec.select_seed if spec.select_seed >= 0 else spec.seed,
                                   "reported_on_seed": spec.seed}
        checkpoint.save_once(os.path.join(workdir, f"p3_{name}_best"), jax.tree.map(lambda x: x[best], cands), first,
                             meta_out | {"merge": record | {"method": name, "coefficients": grid[best]}})
    return rows
