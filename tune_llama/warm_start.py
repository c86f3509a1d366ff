"""The first trials of a search: the spec's own config (``search.include_spec_config``), then, with
``search.warm_start: results/OLD``, an earlier search's best configs.

The configs are handed to ``OptunaSearch(points_to_evaluate=...)``, which enqueues them in the new study
(``optuna.Study.enqueue_trial``), so the sampler proposes them first and learns from their results as from
its own. A config fits when it names exactly the new space's fields and each value lies inside the field's
distribution; the others are skipped with a note, since a search space that changed is an ordinary reason to
warm-start (narrowing a range around what worked).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from tune_llama.errors import UserError
from tune_llama.results import Search, load_search
from tune_llama.spec import Spec, searched_values


def outside(value: Any, dist: dict[str, list]) -> Optional[str]:
    """Why ``value`` cannot be drawn from ``dist`` (a spec distribution such as ``{loguniform: [a, b]}``), or None."""
    (kind, args), = dist.items()
    if kind == "choice":
        return None if value in args else f"not one of {list(args)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"not a number for {kind}"
    low, high = args[0], args[1]
    if not low <= value <= high:
        return f"outside [{low:g}, {high:g}]"
    if kind == "int" and value != int(value):
        return "not a whole number"
    if kind == "quniform" and not math.isclose((value - low) / args[2], round((value - low) / args[2]),
                                               abs_tol=1e-6):
        return f"not on the grid of step {args[2]:g}"
    return None


def misfit(params: dict[str, Any], space: dict[str, dict]) -> Optional[str]:
    """Why ``params`` do not fit ``space``, or None."""
    missing, extra = sorted(set(space) - set(params)), sorted(set(params) - set(space))
    if missing or extra:
        return "; ".join(([f"lacks {', '.join(missing)}"] if missing else [])
                         + ([f"has {', '.join(extra)}, not searched now"] if extra else []))
    reasons = [f"{key}={params[key]!r} {why}" for key in space if (why := outside(params[key], space[key]))]
    return "; ".join(reasons) or None


def old_search(folder: str) -> Search:
    path = Path(folder).expanduser().resolve()
    try:
        return load_search(path)
    except UserError as err:
        raise UserError(f"search.warm_start: {err}") from None


def warm_start_points(spec: Spec) -> tuple[list[dict[str, Any]], list[str]]:
    """(the configs to enqueue, best first; one note per skipped config) for ``spec.search.warm_start``."""
    s = spec.search
    if not s.warm_start:
        return [], []
    old = old_search(s.warm_start)
    points, notes = [], []
    for trial, row in old.ranked():
        if len(points) == s.warm_start_k:
            break
        why = misfit(trial.params, s.space)
        if why:
            notes.append(f"note: search.warm_start: skipped trial {trial.trial_id} of {old.path.name} "
                         f"({old.metric} {row[old.metric]:.4g}): {why}")
        else:
            points.append(dict(trial.params))
    if not points:
        notes.append(f"note: search.warm_start: no config of {old.path} fits this space; starting cold")
    return points, notes


def first_points(spec: Spec) -> tuple[list[dict[str, Any]], list[str]]:
    """(the configs Optuna proposes before its own, in order; one note per config left out): the spec's own
    config first, unless ``search.include_spec_config`` is off or it lies outside the space, then the warm
    start's (without a repeat of the spec's)."""
    points, notes = warm_start_points(spec)
    if not spec.search.include_spec_config:
        return points, notes
    own = searched_values(spec)
    why = misfit(own, spec.search.space)
    if why:
        return points, [f"note: search.include_spec_config: the spec's own config is not tried, it lies outside "
                        f"the space ({why})", *notes]
    return [own, *[p for p in points if p != own]], notes
