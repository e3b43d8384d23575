"""Exporting a data-flow trial as a mergekit ``passthrough`` recipe (see :mod:`evomerge.dataflow.export`).

A merge source (PS+DFS: the first stage's merge) is exported as a recipe file of its own beside the
passthrough recipe (``best.ps.yml``), and the passthrough recipe names the directory that merging it
gives (``best.ps/``, an absolute path), as a mixture's merged experts are. Comments at the top say
how to build it all, with evomerge or with mergekit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.dataflow.candidate import Candidate, parse_candidate
from evomerge.dataflow.export import passthrough_recipe
from evomerge.dataflow.model import resolve_dtype
from evomerge.io import dump_yaml
from evomerge.recipe.schema import parse_recipe
from evomerge.results.export_moe import ExpertFile

__all__ = ["dataflow_export", "source_dirs"]


def source_dirs(cand: Candidate, files: list[ExpertFile]) -> dict[str, Path]:
    """Each used source's model directory once the export's merged sources are built."""
    merged = {f.recipe_path.stem.rpartition(".")[2]: f.model_dir for f in files}
    return {
        n: merged[n] if n in merged else Path(str(cand.sources[n])) for n in cand.used_sources()
    }


def _config(src: str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(src, Mapping):  # a merge: its dtype, else its first model's
        if src.get("dtype"):
            return {"dtype": src["dtype"]}
        models = [m["model"] for m in src.get("models") or ()] or [src.get("base_model")]
        src = str(models[0])
    f = Path(src) / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def dataflow_export(
    mapping: Mapping[str, Any], head: list[str], out: Path
) -> tuple[str, dict[str, Any], list[ExpertFile], Candidate]:
    """The recipe text of a data-flow trial, and its merged sources' recipe files.

    Args:
        mapping: the trial's candidate (``merge_method: dataflow``; references already plain paths).
        head: the comment lines of the export (study, trial, scores).
        out: where the recipe is written (names the merged sources' files beside it).

    Returns:
        ``(text, passthrough recipe mapping, merged source files, the candidate)``.

    Raises:
        ConfigError: the candidate or a merged source's recipe does not load (a bug).
    """
    cand = parse_candidate(mapping, "exported trial")
    refs: dict[str, str] = {}
    files: list[ExpertFile] = []
    for name in cand.used_sources():
        src = cand.sources[name]
        if isinstance(src, Mapping):
            rpath = out.parent / f"{out.stem}.{name}.yml"
            mdir = (out.parent / f"{out.stem}.{name}").absolute()
            parse_recipe(dict(src), f"exported source {name}")
            text = (
                f"# Source {name} of the path in {out.name}: merge it into {mdir} first.\n"
                + dump_yaml(dict(src))
            )
            files.append(ExpertFile(rpath, mdir, text))
            refs[name] = str(mdir)
        else:
            refs[name] = src
    first = cand.sources[cand.steps[0].source]
    dtype = resolve_dtype(cand.dtype, _config(first))
    recipe = passthrough_recipe(cand, refs, dtype)
    head = [ln for ln in head if not ln.startswith("# Reproduce:")]
    at = next((i for i, ln in enumerate(head) if ln.startswith("# evomerge-seed:")), len(head))
    how = [
        f"# A data-flow path of {len(cand.steps)} steps; each step's input scale is folded into the",
        "# output projections of the steps (RMSNorm ignores positive factors), the embedding unscaled.",
        "# Build it:",
        *[
            f"#   evomerge merge {f.recipe_path.name} {f.model_dir}   (or mergekit-yaml)"
            for f in files
        ],
        "#   evomerge merge THIS_FILE OUT_DIR   (or mergekit-yaml THIS_FILE OUT_DIR)",
    ]
    text = "\n".join(head[:at] + how + head[at:]) + "\n" + dump_yaml(recipe)
    parse_recipe(recipe, "exported recipe")  # what we write must load as a recipe
    return text, recipe, files, cand
