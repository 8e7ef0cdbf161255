"""Decision Transformer models (Flax linen); params are plain nested-dict pytrees."""
from mdt_jax.models.dt import (DTConfig, TaskSpec, DecisionTransformer, init_params, apply, param_shapes,
                               count_params)

__all__ = ["DTConfig", "TaskSpec", "DecisionTransformer", "init_params", "apply", "param_shapes", "count_params"]
