"""Behaviour policies: a tanh-Gaussian MLP actor, its checkpoint format, and a NumPy runner.

A policy checkpoint is a folder::

    DIR/policy.json  {"format": "mdt_jax.policy", "format_version": 1, "config": PolicyConfig, "metadata": {...}}
    DIR/params/      orbax StandardCheckpointer pytree (the actor's Flax params, a plain nested dict)

written atomically like DT checkpoints. The metadata records how it was made (command, seed,
steps, wall time) and its measured returns.

The actor's output is (mean, s), each act_dim wide; `PolicyConfig.std` says how s becomes the
Gaussian's std: "exp" (our SAC trainer's, the default, and what a policy.json without the field
means): std = exp(clip(s, -5, 2)); "softplus" (Brax's `NormalTanhDistribution`, for policies
converted by `brax_sac.from_brax`): std = softplus(s) + 0.001.

The same actor runs in two places: in JAX inside the trainer's jitted update, and in NumPy
(`numpy_policy`) in the collection loop, where one batch of a few dozen rows costs microseconds
and a jitted dispatch would cost more than the maths. Both compute the same function (tested).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mdt_jax import trees
from mdt_jax.fileio import orbax_writer, read_config_artifact, read_params_dir, write_dir_atomic, write_json_atomic

FORMAT = "mdt_jax.policy"
FORMAT_VERSION = 1
META_FILE = "policy.json"
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
STD_KINDS = ("exp", "softplus")
SOFTPLUS_MIN_STD = 0.001  # Brax's NormalTanhDistribution min_std


class PolicyError(ValueError):
    """A policy checkpoint is missing, incomplete, corrupt or does not match its config."""


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    task: str
    obs_dim: int
    act_dim: int
    hidden: tuple[int, ...] = (256, 256)
    std: str = "exp"  # how the actor's second half becomes the std (STD_KINDS; see the module doc)

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        for name in ("obs_dim", "act_dim"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"PolicyConfig.{name} must be a positive int, got {v!r}")
        if not self.hidden or min(self.hidden) <= 0:
            raise ValueError(f"PolicyConfig.hidden must be positive layer widths, got {self.hidden!r}")
        if self.std not in STD_KINDS:
            raise ValueError(f"PolicyConfig.std must be one of {STD_KINDS}, got {self.std!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        if not isinstance(d, dict):
            raise TypeError(f"policy config must be a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown policy config fields {sorted(unknown)}")
        return cls(**d)


class MLP(nn.Module):
    hidden: Sequence[int]
    out: int

    @nn.compact
    def __call__(self, x):
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, name=f"dense_{i}")(x))
        return nn.Dense(self.out, name="out")(x)


def log_std_of(s, std: str, xp=jnp):
    """The log std from the actor's second output half `s`, by the `PolicyConfig.std` kind, in
    `xp` (jax.numpy or numpy: the same formula in both)."""
    if std == "exp":
        return xp.clip(s, LOG_STD_MIN, LOG_STD_MAX)
    if std == "softplus":
        return xp.log(xp.logaddexp(s, 0.0) + SOFTPLUS_MIN_STD)
    raise ValueError(f"PolicyConfig.std must be one of {STD_KINDS}, got {std!r}")


class Actor(nn.Module):
    """obs -> (mean, log_std) of a Gaussian whose sample is squashed by tanh into [-1, 1]."""
    hidden: Sequence[int]
    act_dim: int
    std: str = "exp"

    @nn.compact
    def __call__(self, obs):
        out = MLP(self.hidden, 2 * self.act_dim, name="mlp")(obs)
        mean, s = jnp.split(out, 2, axis=-1)
        return mean, log_std_of(s, self.std)


def actor(cfg: PolicyConfig) -> Actor:
    return Actor(cfg.hidden, cfg.act_dim, cfg.std)


def init_actor(cfg: PolicyConfig, rng: jax.Array) -> dict:
    return actor(cfg).init(rng, jnp.zeros((1, cfg.obs_dim)))["params"]


def sample_action(cfg: PolicyConfig, params, obs, rng, deterministic: bool = False):
    """(action, log_prob) with the tanh change of variables; deterministic gives tanh(mean)."""
    mean, log_std = actor(cfg).apply({"params": params}, obs)
    if deterministic:
        return jnp.tanh(mean), jnp.zeros(mean.shape[:-1])
    std = jnp.exp(log_std)
    u = mean + std * jax.random.normal(rng, mean.shape)
    logp = jnp.sum(-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), -1)
    # log(1 - tanh(u)^2), written stably
    logp -= jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), -1)
    return jnp.tanh(u), logp


def numpy_forward(params, obs: np.ndarray, std: str = "exp") -> tuple[np.ndarray, np.ndarray]:
    """The actor in float32 NumPy: (mean, log_std) for obs (N, obs_dim); `std` is the config's."""
    mlp = params["mlp"]
    x = np.asarray(obs, np.float32)
    n = len([k for k in mlp if k.startswith("dense_")])
    for i in range(n):
        x = np.maximum(x @ mlp[f"dense_{i}"]["kernel"] + mlp[f"dense_{i}"]["bias"], 0)
    out = x @ mlp["out"]["kernel"] + mlp["out"]["bias"]
    mean, s = np.split(out, 2, axis=-1)
    return mean, log_std_of(s, std, np).astype(np.float32)


def numpy_policy(params, deterministic: bool = False,
                 std: str = "exp") -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """`policy(obs, rng) -> actions` for `collect`: a tanh-Gaussian sample (as D4RL's data was
    collected), or tanh(mean) with `deterministic`; `std` is the policy config's."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    log_std_of(np.zeros(1, np.float32), std, np)  # an unknown kind fails here, not at the first step

    def policy(obs, rng):
        mean, log_std = numpy_forward(params, obs, std)
        if deterministic:
            return np.tanh(mean)
        return np.tanh(mean + np.exp(log_std) * rng.standard_normal(mean.shape).astype(np.float32))
    return policy


def _shapes(cfg: PolicyConfig) -> dict:
    return jax.eval_shape(lambda: init_actor(cfg, jax.random.key(0)))


def _check(cfg: PolicyConfig, params, what: str) -> None:
    trees.check_shapes(params, trees.shapes(_shapes(cfg)), error=PolicyError, prefix=f"{what} do not fit the policy config",
                   limit=10)
    trees.check_finite(params, error=PolicyError, where=what)


def save_policy(directory, params, cfg: PolicyConfig, metadata: dict | None = None, *, overwrite: bool = False) -> str:
    _check(cfg, params, "params")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(), "metadata": metadata or {}}
    json.dumps(meta)  # fail before writing anything if the metadata is not JSON

    return write_dir_atomic(directory, {"params": orbax_writer(params), META_FILE: lambda p: write_json_atomic(p, meta)},
                            overwrite=overwrite)


def read_policy_meta(directory) -> tuple[PolicyConfig, dict]:
    return read_config_artifact(directory, META_FILE, FORMAT, FORMAT_VERSION, PolicyError, "policy checkpoint",
                                PolicyConfig.from_dict)


def load_policy(directory) -> tuple[PolicyConfig, dict, dict]:
    """(config, params, metadata); shapes are checked against the config before restoring."""
    directory = os.path.abspath(os.fspath(directory))
    cfg, metadata = read_policy_meta(directory)
    params = read_params_dir(directory, PolicyError, "policy checkpoint", _shapes(cfg),
                             lambda tree, where: trees.check_finite(tree, error=PolicyError, where=where))
    return cfg, params, metadata
