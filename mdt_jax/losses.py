"""The training losses, shared by training (`mdt_jax.train`) and the Fisher (`mdt_jax.fisher`).

- `action_loss`: the reference's masked action MSE (mean over unmasked steps x real action dims;
  for multi-task models the sum over tasks of each task's own mean);
- `init_reg`: c * sum over anchored tensors of ||theta - theta_init||_2 (unsquared), with
  torch's gradient 0 at theta = theta_init.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mdt_jax.models.dt import DTConfig, apply


def safe_norm(x):
    """||x||_2 with gradient 0 (not NaN) at x = 0, like torch's norm backward."""
    sq = jnp.sum(jnp.square(x))
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def act_dims(cfg: DTConfig, batch: dict) -> jax.Array:
    """Per-sample number of real action dims: (B,) for multi-task, else a scalar."""
    if cfg.multi:
        return jnp.asarray([t.act_dim for t in cfg.tasks], jnp.int32)[batch["task_id"]]
    return jnp.asarray(batch.get("act_dim", cfg.act_dim), jnp.int32)


def action_loss(cfg: DTConfig, params, batch: dict, rng: jax.Array | None = None) -> jax.Array:
    """Masked action MSE (reference: mean over unmasked steps x action dims).

    Multi-task: the sum over tasks of each task's own masked mean (the reference's summed
    per-task losses). `batch['act_dim']` (scalar) masks padded action dims of a single-task model
    trained on padded data (vmap over tasks).
    """
    preds = apply(cfg, params, batch["states"], batch["actions"], batch["rtg"], batch["timesteps"],
                  batch["mask"], batch.get("task_id"), rng=rng)
    A = preds.shape[-1]
    dims = act_dims(cfg, batch)
    dim_ok = (jnp.arange(A) < jnp.reshape(dims, (-1, 1, 1))).astype(preds.dtype)
    valid = batch["mask"][..., None].astype(preds.dtype) * dim_ok
    err = jnp.square(preds - batch["actions"]) * valid
    if not cfg.multi:
        return jnp.sum(err) / jnp.maximum(jnp.sum(valid), 1.0)
    onehot = jax.nn.one_hot(batch["task_id"], len(cfg.tasks), dtype=preds.dtype)
    sums = jnp.einsum("bka,bt->t", err, onehot)
    counts = jnp.einsum("bka,bt->t", valid * jnp.ones_like(err), onehot)
    return jnp.sum(jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0))


def init_reg(anchor: dict, weight, flat_params: dict) -> jax.Array:
    """weight * sum_k ||flat_params[k] - anchor[k]||_2 over the anchored keys; 0 without anchors."""
    terms = [safe_norm(flat_params[k] - a) for k, a in anchor.items()]
    return weight * sum(terms) if terms else jnp.zeros(())
