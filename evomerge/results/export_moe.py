"""Exporting a mixture-of-experts trial as a mergekit-moe configuration.

A trial's stored configuration may hold merged experts (an expert whose ``source_model`` is a merge
recipe). mergekit-moe takes model directories only, so each merged expert is exported as a recipe
file of its own beside the configuration (``best.expert3.yml``), and the configuration names the
directory that merging it gives (``best.expert3/``, an absolute path). Comments at the top say how to
build it all, with evomerge or with mergekit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.engine.rng import seed_from_text
from evomerge.io import dump_yaml
from evomerge.moe.config import parse_moe_config
from evomerge.recipe.schema import parse_recipe

__all__ = ["ExpertFile", "moe_export"]


@dataclass(frozen=True)
class ExpertFile:
    """A merged expert of an exported mixture: its recipe file, the model directory the
    configuration names, and the recipe's text."""

    recipe_path: Path
    model_dir: Path
    text: str


def moe_export(
    recipe: Mapping[str, Any], head: list[str], out: Path
) -> tuple[str, dict[str, Any], list[ExpertFile]]:
    """The configuration text of an MoE trial, and its merged experts' recipe files.

    Args:
        recipe: the trial's configuration (``merge_method: moe``; experts may be recipe mappings).
        head: the comment lines of the export (study, trial, scores, seed).
        out: where the configuration is written (names the experts' files beside it).

    Returns:
        ``(text, mergekit-moe mapping, expert files)``.

    Raises:
        ConfigError: the exported configuration or an expert's recipe does not load (a bug).
    """
    cfg: dict[str, Any] = {k: v for k, v in recipe.items() if k != "merge_method"}
    files: list[ExpertFile] = []
    experts = []
    for i, e in enumerate(recipe.get("experts") or ()):
        e = dict(e)
        src = e.get("source_model")
        if isinstance(src, Mapping):
            rpath = out.parent / f"{out.stem}.expert{i}.yml"
            mdir = (out.parent / f"{out.stem}.expert{i}").absolute()
            text = (
                f"# Expert {i} of the mixture in {out.name}: merge it into {mdir} before building the mixture.\n"
                + dump_yaml(dict(src))
            )
            parse_recipe(dict(src), f"exported expert {i}")
            files.append(ExpertFile(rpath, mdir, text))
            e["source_model"] = str(mdir)
        experts.append(e)
    cfg["experts"] = experts
    steps = [
        f"#   evomerge merge {f.recipe_path.name} {f.model_dir}   (or mergekit-yaml)" for f in files
    ]
    head = [ln for ln in head if not ln.startswith("# Reproduce:")]
    at = next((i for i, ln in enumerate(head) if ln.startswith("# evomerge-seed:")), len(head))
    seed = seed_from_text(head[at]) if at < len(head) else None
    seed = seed if seed is not None else 0
    how = [
        "# A mergekit-moe configuration. Reproduce:",
        *steps,
        f"#   evomerge moe THIS_FILE OUT_DIR --seed {seed}   (or mergekit-moe THIS_FILE OUT_DIR --random-seed {seed})",
    ]
    text = "\n".join(head[:at] + how + head[at:]) + "\n" + dump_yaml(cfg)
    parse_moe_config(cfg, "exported configuration")  # what we write must load
    return text, cfg, files
