"""The model card (README.md) of a merged model.

Its front matter lists every parent under ``base_model:`` and tags the model as a merge, so that
hub tools, leaderboards and evomerge itself (merge-lineage flag) recognise a merge of merges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from evomerge.engine.plan import MergePlan

__all__ = ["render_card"]


def render_card(plan: MergePlan, recipe_yaml: str, *, extra: str = "", name: str | None = None) -> str:
    """Markdown model card with front matter for a merge.

    Args:
        plan: the executed plan (method, parents, layer count).
        recipe_yaml: the recipe as saved in ``mergekit_config.yml``.
        extra: more markdown sections (the search's evaluation and contamination section).
        name: a title; default "Merged model".
    """
    cfg = plan.recipe
    front = {
        "base_model": list(plan.parents),
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "mergekit", "evomerge"],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name or 'Merged model'}",
        "",
        f"This model is a merge of pre-trained language models, made with evomerge using the "
        f"`{cfg.merge_method}` merge method (mergekit-compatible recipe below).",
        "",
        "## Merged models",
        "",
    ]
    base = cfg.base_model
    for p in plan.parents:
        lines.append(f"* {p}" + (" (base)" if p == base else ""))
    lines += [
        "",
        f"The result has {plan.num_layers} layers; tensors are saved as {plan.out_dtype}.",
        "",
        "## Configuration",
        "",
        "The following YAML configuration was used to produce this model:",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    if extra:
        lines += [extra.rstrip(), ""]
    return "\n".join(lines)
