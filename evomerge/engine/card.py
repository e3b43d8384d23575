"""The model card (README.md) of a merged model, and the other files written beside its weights.

Its front matter lists every parent under ``base_model:`` and tags the model as a merge, so that
hub tools, leaderboards and evomerge itself (merge-lineage flag) recognise a merge of merges.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from evomerge.engine.sources import ModelSource, resolve_model
from evomerge.io import dump_yaml

if TYPE_CHECKING:
    from evomerge.engine.plan import MergePlan

__all__ = ["render_card", "write_metadata", "copy_model_files", "TOKENIZER_FILES"]

TOKENIZER_FILES = (  # the files a merged model's tokenizer is copied from
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.txt",
    # a vision-language model's processor: without them AutoProcessor cannot load the merge
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
)


def render_card(
    plan: MergePlan, recipe_yaml: str, *, extra: str = "", name: str | None = None
) -> str:
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


def copy_model_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    """Copy each of ``names`` that ``src`` has into ``dst`` (a model's side files: the generation
    config, the tokenizer's and processor's files). The copies are new files: their mode follows
    the umask like every file written, not the source's (a read-only file of a shared cache)."""
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def write_metadata(
    path: Path,
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    copy_tokenizer: bool,
    recipe_text: str | None,
    card_extra: str,
) -> None:
    """Write a merged model's files beside its weights: ``config.json``, the generation config,
    the tokenizer's (and processor's) files, ``mergekit_config.yml`` and the model card."""
    cfg = plan.recipe
    (path / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
    ref_dir = sources[plan.reference].path
    copy_model_files(ref_dir, path, ("generation_config.json",))
    if copy_tokenizer:
        tok = cfg.tokenizer_source
        if tok is None or tok == "base":
            tok_dir = ref_dir
        elif tok in sources:
            tok_dir = sources[tok].path
        else:
            tok_dir = resolve_model(tok, file=cfg.source_file, field="tokenizer_source")
        copy_model_files(tok_dir, path, TOKENIZER_FILES)
        if cfg.chat_template:
            tc_path = path / "tokenizer_config.json"
            tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
            tc["chat_template"] = cfg.chat_template
            tc_path.write_text(json.dumps(tc, indent=2) + "\n")
            (path / "chat_template.jinja").unlink(missing_ok=True)
    text = recipe_text if recipe_text is not None else dump_yaml(dict(cfg.raw))
    (path / "mergekit_config.yml").write_text(text)
    (path / "README.md").write_text(render_card(plan, text, extra=card_extra))
