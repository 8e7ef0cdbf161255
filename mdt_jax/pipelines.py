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

These functions only merge; training, Fishers and evaluation are passed in or done by the caller
(`mdt_jax.run`), so each stage can be cached.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from mdt_jax import merge as M
from mdt_jax import trees
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
