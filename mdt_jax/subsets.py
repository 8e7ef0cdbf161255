"""Parameter subsets chosen by path patterns: one mechanism for freezing, Fisher and merging.

A param's path is its dict keys joined by '/', e.g. ``block_1/attn/c_attn/kernel``. A pattern is
an fnmatch glob that matches a path or any prefix of it ending at a '/', so ``block_*/attn``
selects both attention kernels and biases of every block. Named aliases expand to patterns:

=========== ============================================================================
alias       patterns
=========== ============================================================================
attn        block_*/attn
mlp         block_*/mlp
ln          block_*/ln_1, block_*/ln_2            (the blocks' LayerNorms)
blocks      block_*                               (the trunk blocks; alias: trunk)
embeddings  embed_*, task_*/embed_*               (incl. embed_timestep and embed_ln)
timestep    embed_timestep
heads       predict_*, task_*/predict_*
ln_f        ln_f
all         *
=========== ============================================================================
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import jax

from mdt_jax.trees import path_str, paths  # noqa: F401  (path_str: the path convention, kept importable here)

ALIASES: dict[str, tuple[str, ...]] = {
    "attn": ("block_*/attn",),
    "mlp": ("block_*/mlp",),
    "ln": ("block_*/ln_1", "block_*/ln_2"),
    "blocks": ("block_*",),
    "trunk": ("block_*",),
    "embeddings": ("embed_*", "task_*/embed_*"),
    "timestep": ("embed_timestep",),
    "heads": ("predict_*", "task_*/predict_*"),
    "ln_f": ("ln_f",),
    "all": ("*",),
}


def pattern_names(patterns: str | Iterable[str]) -> list[str]:
    if isinstance(patterns, str):  # comma-separated (CLI friendly)
        patterns = patterns.split(",")
    return [p.strip() for p in patterns if p.strip()]


def expand(patterns: str | Iterable[str]) -> tuple[str, ...]:
    """Aliases -> glob patterns."""
    return tuple(g for p in pattern_names(patterns) for g in ALIASES.get(p, (p,)))


def matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + "/*") for p in patterns)


def select(tree, patterns: str | Iterable[str], *, exclude: str | Iterable[str] = (), strict: bool = True):
    """A bool pytree shaped like `tree`: True where the leaf's path matches `patterns` and not `exclude`.

    With `strict`, a pattern that matches nothing raises ValueError (catches typos such as 'atn').
    """
    inc, exc = expand(patterns), expand(exclude)
    names = paths(tree)
    if strict:
        for pat in pattern_names(patterns) + pattern_names(exclude):
            if not any(matches(p, expand(pat)) for p in names):
                raise ValueError(f"parameter pattern {pat!r} matches no parameter; paths look like "
                                 f"{names[:3]}; aliases: {sorted(ALIASES)}")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: matches(path_str(p), inc) and not matches(path_str(p), exc), tree)


def fraction(tree, mask) -> float:
    """Fraction of scalar parameters selected by a bool mask tree."""
    sizes = jax.tree.leaves(jax.tree.map(lambda x, m: (x.size * bool(m), x.size), tree, mask),
                            is_leaf=lambda x: isinstance(x, tuple))
    return sum(s for s, _ in sizes) / max(1, sum(n for _, n in sizes))
