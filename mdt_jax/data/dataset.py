"""`OfflineDataset`: transitions in the flat D4RL layout, plus the trajectory view of the reference.

A trajectory ends after any step with `terminals[i]` or `timeouts[i]` set (the reference's D4RL
conversion rule); an unfinished tail at the end of the arrays is a trajectory too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

FLOAT_FIELDS = ("observations", "actions", "rewards", "next_observations")
NDIMS = {"observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1, "next_observations": 2}
TRAJ_KEYS = ("observations", "actions", "rewards", "terminals")


@dataclasses.dataclass(frozen=True, eq=False)
class OfflineDataset:
    """N transitions: observations (N,S), actions (N,A), rewards (N,) float32; terminals, timeouts
    (N,) bool; optional next_observations (N,S); free-form JSON-able `metadata`.

    Construction casts to those dtypes and runs `validate()`.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    next_observations: np.ndarray | None = None
    metadata: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in NDIMS:
            value = getattr(self, name)
            if value is not None:
                dtype = np.float32 if name in FLOAT_FIELDS else bool
                try:
                    array = np.asarray(value, dtype)
                except (ValueError, TypeError) as e:  # ragged rows, text, objects
                    raise ValueError(f"OfflineDataset.{name}: not a {np.dtype(dtype).name} array "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
                object.__setattr__(self, name, array)
        object.__setattr__(self, "metadata", dict(self.metadata or {}))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for a wrong ndim, a length mismatch, NaN/Inf or no data."""
        fields = {name: getattr(self, name) for name in NDIMS if getattr(self, name) is not None}
        for name, value in fields.items():
            if value.ndim != NDIMS[name]:
                raise ValueError(f"OfflineDataset.{name}: expected {NDIMS[name]} dims, got shape {value.shape}")
        n = len(self.rewards)
        if n == 0:
            raise ValueError("OfflineDataset.rewards: empty dataset (0 transitions)")
        for name, value in fields.items():
            if len(value) != n:
                raise ValueError(f"OfflineDataset.{name}: {len(value)} rows, but rewards has {n}")
            if name in FLOAT_FIELDS and not np.isfinite(value).all():
                bad = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
                raise ValueError(f"OfflineDataset.{name}: non-finite value {value[bad]} at index {bad}")
        if self.next_observations is not None and self.next_observations.shape != self.observations.shape:
            raise ValueError(f"OfflineDataset.next_observations: shape {self.next_observations.shape} "
                             f"!= observations shape {self.observations.shape}")

    def __len__(self) -> int:
        """Number of transitions N."""
        return len(self.rewards)

    @property
    def state_dim(self) -> int:
        """Observation width S."""
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        """Action width A."""
        return self.actions.shape[1]

    def trajectory_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) int64 arrays, one entry per trajectory, in order."""
        ends = np.flatnonzero(self.terminals | self.timeouts) + 1
        if not len(ends) or ends[-1] != len(self):
            ends = np.append(ends, len(self))
        starts = np.concatenate([[0], ends[:-1]])
        return starts, ends - starts

    def to_trajectories(self) -> list[dict[str, np.ndarray]]:
        """The reference's pickle layout: one dict per trajectory with observations, actions,
        rewards, terminals (and next_observations when present); arrays are copies."""
        keys = TRAJ_KEYS + (("next_observations",) if self.next_observations is not None else ())
        return [{k: getattr(self, k)[s:s + n].copy() for k in keys} for s, n in zip(*self.trajectory_bounds())]

    @classmethod
    def from_trajectories(cls, trajectories: Sequence[dict[str, Any]],
                          metadata: dict | None = None) -> "OfflineDataset":
        """Concatenate reference-style trajectory dicts ('dones' is accepted for 'terminals').

        A trajectory may be terminal only at its last step; one that does not end in a terminal
        gets `timeouts` set at its last step, so `to_trajectories` gives the same split back.
        """
        if not len(trajectories):
            raise ValueError("from_trajectories: no trajectories")
        columns: dict[str, list] = {k: [] for k in TRAJ_KEYS + ("timeouts", "next_observations")}
        for i, traj in enumerate(trajectories):
            if not isinstance(traj, dict):
                raise ValueError(f"trajectory {i}: expected a dict, got {type(traj).__name__}")
            traj = {("terminals" if k == "dones" and "terminals" not in traj else k): _column(v, f"trajectory {i}: {k!r}")
                    for k, v in traj.items()}
            for k in TRAJ_KEYS:
                if k not in traj:
                    raise ValueError(f"trajectory {i}: missing key {k!r}")
            n = len(traj["rewards"]) if traj["rewards"].ndim == 1 else 0
            if n == 0:
                raise ValueError(f"trajectory {i}: 'rewards' must be a non-empty 1-d array, "
                                 f"got shape {traj['rewards'].shape}")
            for k in TRAJ_KEYS + ("next_observations",):
                if k in traj and traj[k].shape[:1] != (n,):
                    raise ValueError(f"trajectory {i}: {k!r} has shape {traj[k].shape}, 'rewards' has {n} steps")
                if k in traj and k in ("rewards", "terminals") and traj[k].ndim != 1:
                    raise ValueError(f"trajectory {i}: {k!r} must be 1-d, got shape {traj[k].shape}")
            terminals = traj["terminals"].astype(bool).reshape(n)
            if terminals[:-1].any():
                raise ValueError(f"trajectory {i}: 'terminals' set before the last step "
                                 f"(at {int(np.flatnonzero(terminals)[0])} of {n})")
            for k in TRAJ_KEYS:
                columns[k].append(terminals if k == "terminals" else traj[k])
            columns["timeouts"].append((np.arange(n) == n - 1) & ~terminals[-1])
            columns["next_observations"].append(traj.get("next_observations"))
        nexts = columns.pop("next_observations")
        nexts = _concatenate(nexts, "next_observations") if all(x is not None for x in nexts) else None
        return cls(**{k: _concatenate(v, k) for k, v in columns.items()}, next_observations=nexts,
                   metadata=metadata or {})


def _column(value, what: str) -> np.ndarray:
    """np.asarray(value), a ragged or otherwise unreadable value being a ValueError naming `what`."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what} is not an array ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _concatenate(parts: list, key: str) -> np.ndarray:
    """The trajectories' `key` arrays end to end; trajectories whose widths differ are a ValueError
    naming the key and the first trajectory that differs from trajectory 0."""
    for i, x in enumerate(parts):
        if x.shape[1:] != parts[0].shape[1:]:
            raise ValueError(f"trajectory {i}: {key!r} has shape {x.shape}, trajectory 0's has {parts[0].shape} "
                             "(every trajectory must have the same widths)")
    return np.concatenate(parts)
