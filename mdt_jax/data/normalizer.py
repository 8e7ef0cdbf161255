"""The per-task observation normaliser that travels with a model (brax's way: the normaliser is
part of the policy, not of the dataset that trained it).

A DT sees ``(s - state_mean) / state_std`` and returns-to-go divided by ``rtg_scale``. The numbers
come from the training dataset (`Normalizer.of(segment_data)`: the reference's mean and std + 1e-6
over every observation), are saved in the model's checkpoint (`mdt_jax.checkpoint`), and are what
evaluation, Fisher/Gram batches and finetunes of that model use, whatever data they read.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Normalizer:
    state_mean: np.ndarray   # (S,) float32
    state_std: np.ndarray    # (S,) float32, > 0 (std + 1e-6 of the training observations)
    rtg_scale: float = 1000.0

    def __post_init__(self):
        mean = np.asarray(self.state_mean, np.float32)
        std = np.asarray(self.state_std, np.float32)
        if mean.ndim != 1 or mean.shape != std.shape or mean.size == 0:
            raise ValueError(f"Normalizer: state_mean and state_std must be equal-length non-empty vectors, "
                             f"got shapes {np.shape(self.state_mean)} and {np.shape(self.state_std)}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
            raise ValueError("Normalizer: state_mean/state_std hold NaN or inf")
        if np.any(std <= 0):
            raise ValueError(f"Normalizer.state_std: must be > 0 everywhere, got min {float(std.min())}")
        if isinstance(self.rtg_scale, bool) or not isinstance(self.rtg_scale, (int, float)) \
                or not math.isfinite(self.rtg_scale) or self.rtg_scale <= 0:
            raise ValueError(f"Normalizer.rtg_scale: must be a finite number > 0, got {self.rtg_scale!r}")
        object.__setattr__(self, "state_mean", mean)
        object.__setattr__(self, "state_std", std)
        object.__setattr__(self, "rtg_scale", float(self.rtg_scale))

    @property
    def state_dim(self) -> int:
        return int(self.state_mean.shape[0])

    @classmethod
    def of(cls, data) -> "Normalizer":
        """The normaliser a `SegmentData` was built with (its dataset's statistics)."""
        return cls(np.asarray(data.state_mean), np.asarray(data.state_std), float(data.rtg_scale))

    def apply_to(self, data):
        """`data` (a SegmentData) normalised with these statistics instead of its own."""
        import jax.numpy as jnp

        if int(data.state_mean.shape[-1]) != self.state_dim:
            raise ValueError(f"Normalizer: {self.state_dim} state dims, but the data has {data.state_mean.shape[-1]}")
        return data.replace(state_mean=jnp.asarray(self.state_mean), state_std=jnp.asarray(self.state_std),
                            rtg_scale=self.rtg_scale)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Normalizer) and self.rtg_scale == other.rtg_scale
                and np.array_equal(self.state_mean, other.state_mean) and np.array_equal(self.state_std, other.state_std))

    def to_dict(self) -> dict:
        return {"state_mean": self.state_mean.tolist(), "state_std": self.state_std.tolist(), "rtg_scale": self.rtg_scale}

    @classmethod
    def from_dict(cls, d: dict, where: str = "normaliser") -> "Normalizer":
        if not isinstance(d, dict) or "state_mean" not in d or "state_std" not in d:
            raise ValueError(f"{where}: needs state_mean and state_std")
        try:
            return cls(np.asarray(d["state_mean"], np.float32), np.asarray(d["state_std"], np.float32),
                       d.get("rtg_scale", 1000.0))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
