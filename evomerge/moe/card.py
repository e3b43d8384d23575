"""The model card (README.md) of a mixture of experts: its experts, their prompts and the routing."""

from __future__ import annotations

import yaml

from evomerge.moe.config import MoEConfig

__all__ = ["render_moe_card"]


def _quoted(prompts: tuple[str, ...]) -> str:
    return ", ".join(f"`{p}`" for p in prompts) if prompts else "none"


def render_moe_card(
    cfg: MoEConfig, config_yaml: str, *, dtype: str, extra: str = "", name: str | None = None
) -> str:
    """Markdown model card with front matter for a mixture of experts.

    Args:
        cfg: the configuration that was built.
        config_yaml: the configuration as saved in ``mergekit_moe_config.yml``.
        dtype: the saved tensors' dtype.
        extra: more markdown sections (a search's evaluation section).
        name: a title; default "Mixture of experts".

    Returns:
        The card's text.
    """
    front = {
        "base_model": cfg.referenced_models(),
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["moe", "merge", "mergekit", "evomerge"],
    }
    n = len(cfg.experts)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name or 'Mixture of experts'}",
        "",
        f"A Mixtral-style mixture of {n} experts made with evomerge (a mergekit-moe configuration, below). "
        f"Attention, embeddings and norms come from `{cfg.base_model}`; each expert is the MLP of one model, "
        f"and every token is routed to {cfg.experts_per_token} of the {n} experts at each layer. "
        f"Router weights: `gate_mode: {cfg.gate_mode}`; tensors are saved as {dtype}.",
        "",
        "## Experts",
        "",
        "| # | model | positive prompts | negative prompts |",
        "|---|---|---|---|",
    ]
    for i, e in enumerate(cfg.experts):
        extras = []
        if e.noise_scale is not None:
            extras.append(f"noise_scale {e.noise_scale:g}")
        if e.residual_scale is not None:
            extras.append(f"residual_scale {e.residual_scale:g}")
        model = e.source_model + (f" ({', '.join(extras)})" if extras else "")
        lines.append(
            f"| {i} | {model} | {_quoted(e.positive_prompts)} | {_quoted(e.negative_prompts)} |"
        )
    lines += [
        "",
        "## Configuration",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
    ]
    if extra:
        lines += [extra.rstrip(), ""]
    return "\n".join(lines)
