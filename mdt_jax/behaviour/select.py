"""Choosing the committed behaviour policies from a behaviour-training run's saved actors."""
from __future__ import annotations

import os

from mdt_jax.behaviour.datasets import POLICIES_DIR
from mdt_jax.envs import get_task
from mdt_jax.fileio import write_json_atomic


def select_behaviour(task: str, workdir: str, *, episodes: int = 20, seed: int = 0, medium_fraction: float = 0.4,
                     medium_min: float = 0.25, medium_max: float = 0.6, out: str = "", overwrite: bool = False) -> dict:
    """Pick the expert and medium checkpoints of a behaviour run.

    Every saved actor in WORKDIR/policies is evaluated on `episodes` episodes (deterministic,
    tanh(mean)); the expert is the best; the medium is the checkpoint whose mean return is
    closest to `medium_fraction` of the expert's, within [medium_min, medium_max] of it. Both are
    evaluated again stochastically (how datasets are collected) and saved with their returns, the
    training command, seed and wall time to `out` (by default the package's committed policies).
    """
    from mdt_jax.behaviour import policy as pol
    from mdt_jax.behaviour.sac import evaluate_policy

    get_task(task)
    if not 0 < medium_min <= medium_fraction <= medium_max < 1:
        raise ValueError("medium_min <= medium_fraction <= medium_max must lie in (0, 1)")
    root = os.path.join(workdir, "policies")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no behaviour policies (run launch.train_behaviour first)")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    if not steps:
        raise FileNotFoundError(f"{root}: no step_* checkpoints")
    out = out or os.path.join(POLICIES_DIR, task)
    if not overwrite:
        for q in ("expert", "medium"):
            if os.path.exists(os.path.join(out, q)):
                raise FileExistsError(f"{os.path.join(out, q)} exists; pass --overwrite=True to replace it")
    scores = {}
    for s in steps:
        cfg, params, meta = pol.load_policy(os.path.join(root, s))
        if cfg.task != task:
            raise ValueError(f"{root}/{s}: a policy for {cfg.task!r}, not {task!r}")
        r = evaluate_policy(task, params, episodes, seed=seed, std=cfg.std)
        scores[s] = (float(r.mean()), float(r.std()))
        print(f"{task} {s}: {scores[s][0]:9.1f} ± {scores[s][1]:7.1f}", flush=True)
    expert = max(scores, key=lambda s: scores[s][0])
    best = scores[expert][0]
    inside = [s for s in scores if medium_min * best <= scores[s][0] <= medium_max * best]
    if not inside:
        raise ValueError(f"{root}: no checkpoint scores within [{medium_min}, {medium_max}] of the "
                         f"expert's {best:.1f}; save checkpoints more often")
    medium = min(inside, key=lambda s: abs(scores[s][0] - medium_fraction * best))
    summary = {}
    for q, s in (("expert", expert), ("medium", medium)):
        cfg, params, meta = pol.load_policy(os.path.join(root, s))
        stoch = evaluate_policy(task, params, episodes, seed=seed, deterministic=False, std=cfg.std)
        sel = {"checkpoint": s, "episodes": int(episodes), "eval_seed": int(seed),
               "return_mean": scores[s][0], "return_std": scores[s][1],
               "stochastic_return_mean": float(stoch.mean()), "stochastic_return_std": float(stoch.std()),
               "fraction_of_expert": scores[s][0] / best}
        pol.save_policy(os.path.join(out, q), params, cfg, meta | {"quality": q, "selection": sel},
                        overwrite=bool(overwrite))
        summary[q] = sel | {"env_steps": meta.get("env_steps"), "wall_s": meta.get("wall_s"),
                            "seed": meta.get("seed"), "command": meta.get("command")}
    write_json_atomic(os.path.join(out, "selection.json"), {"task": task, "scores": scores, **summary})
    return summary
