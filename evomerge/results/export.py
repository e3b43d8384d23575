"""``evomerge export``: a trial's recipe as a plain mergekit YAML, optionally merged to disk.

The recipe is exactly what the trial merged (stored with the trial), so ``evomerge merge`` of
the exported file reproduces the trial's tensors (same hash). Comments on top record the study,
the trial, its scores, the seed of random masks and the contamination flags; mergekit ignores
comments, so ``mergekit-yaml best.yml out`` accepts the file for the methods it has.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from evomerge.contamination.render import as_comments, render_contamination_section
from evomerge.contamination.rules import assessment_from_dict
from evomerge.dataflow.candidate import is_dataflow_mapping
from evomerge.dataflow.export import compare_built
from evomerge.engine.hashes import is_fingerprint
from evomerge.engine.merger import merge_to_disk
from evomerge.engine.rng import SEED_PRAGMA, pragma_from_text, seed_from_text
from evomerge.engine.writer import AtomicDir
from evomerge.errors import EvomergeError, one_line
from evomerge.io import atomic_text, dump_yaml
from evomerge.moe.config import is_moe_mapping
from evomerge.moe.write import moe_to_disk
from evomerge.recipe.schema import parse_recipe
from evomerge.results.export_dataflow import dataflow_export, source_dirs
from evomerge.results.export_moe import moe_export
from evomerge.results.provenance import evaluation_lines, unseen_score
from evomerge.schemes import resolve, scheme_of
from evomerge.search.records import StudyRecords
from evomerge.search.storage import load_study, locate
from evomerge.search.table import chosen_row, trials_frame

__all__ = [
    "export_recipe",
    "main_export",
    "SEED_PRAGMA",
    "seed_from_text",
    "pragma_from_text",
]  # the pragma lives in evomerge.engine.rng


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _plain_refs(recipe: Any) -> Any:
    """Scheme references (``zoo:demo/rot``) are evomerge's own; mergekit needs a directory, so the
    export names such models by absolute path (hub ids and paths stay as written)."""
    if isinstance(recipe, dict):
        return {k: _plain_refs(v) for k, v in recipe.items()}
    if isinstance(recipe, list):
        return [_plain_refs(v) for v in recipe]
    if isinstance(recipe, str) and scheme_of(recipe) is not None:
        return str(resolve(recipe) or recipe)
    return recipe


def _check_file(path: Path, force: bool) -> None:
    if path.is_dir():
        raise EvomergeError(f"-o {path}: is a directory; name the recipe file to write")
    if path.exists() and not force:
        raise EvomergeError(f"-o {path}: file exists (pass --force to overwrite)")


def _atomic_write(path: Path, text: str, force: bool) -> None:
    _check_file(path, force)
    try:
        atomic_text(path, text)
    except OSError as e:
        raise EvomergeError(f"-o {path}: cannot write: {one_line(e.strerror or e)}") from None


def export_recipe(
    study: Any, *, trial: int | None = None, space_file: str | None = None, out: Path | None = None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The exported recipe text of a trial.

    Args:
        study: the Optuna study.
        trial: trial number; default: the chosen trial (:func:`~evomerge.search.table.chosen_row`:
            the best validation score among the re-scored trials, else the best search score).
        space_file: named in the header.
        out: where the recipe goes (a mixture of experts' merged experts are written beside it).

    Returns:
        ``(text, recipe mapping, info)``; info has ``number``, ``digest``, ``seed``, ``stream``, ``section``
        (the markdown contamination section for a model card), ``evaluation`` (which items chose
        the trial and which scored it, :func:`~evomerge.results.provenance.evaluation_lines`),
        ``moe`` (a mixture of experts) and
        ``expert_files`` (its merged experts' recipe files, :class:`~evomerge.results.export_moe.ExpertFile`).

    Raises:
        EvomergeError: no such trial, or it did not complete.
    """
    records = StudyRecords(study)
    meta = records.meta()
    df = trials_frame(study)
    if trial is None:
        row = chosen_row(df)
        if row is None:
            raise EvomergeError(f"study {study.study_name!r} has no completed trial to export")
        number = int(row["number"])
    else:
        number = trial
        hits = df[(df["number"] == number)] if len(df) else df
        if hits.empty:
            raise EvomergeError(
                f"--trial {number}: study {study.study_name!r} has no trial {number} (it has 0..{len(study.trials) - 1})"
            )
        row = hits.iloc[0]
        if row["state"] != "COMPLETE":
            raise EvomergeError(
                f"--trial {number}: trial {number} is {row['state']}, not COMPLETE"
                + (f" ({row['error']})" if row.get("error") else "")
            )
    rec = records.trial(study.trials[number])
    recipe = _plain_refs(yaml.safe_load(rec.recipe or "{}"))
    seed = int(meta.seed)
    stream = int(getattr(meta, "stream", 1))
    score, score_se = _num(row.get("score")), _num(row.get("score_se"))
    unseen = unseen_score(row)
    evaluation = evaluation_lines(df, row)
    assessment = assessment_from_dict(meta.assessment) if meta.assessment else None
    section = ""
    if assessment is not None:
        section = render_contamination_section(
            assessment,
            search=(score, score_se or 0.0) if score is not None else None,
            unseen=unseen[1:] if unseen is not None else None,
            unseen_split=unseen[0] if unseen is not None else "test",
            evaluation=evaluation,
            probe=records.probe(number),
        )
    head = [
        f"# Exported by evomerge from study {study.study_name!r}"
        + (f" (space {space_file})" if space_file else "")
        + f", trial {number}.",
        f"# Search tasks: {', '.join(meta.search_tasks)}; holdout (validation and test) tasks: "
        + (", ".join(meta.holdout_tasks) or "none"),
        *(f"# {line}." for line in evaluation),
        f"# Path digest of the trial (it copied no tensors, so none were hashed): {rec.digest or ''}"
        if is_dataflow_mapping(recipe)
        else f"# Tensor hash of the merge: {rec.digest or ''}",
        f"# Reproduce: evomerge merge THIS_FILE OUT_DIR   (random masks use seed {seed} and random stream {stream}, read from the next line)",
        SEED_PRAGMA.format(seed=seed, stream=stream),
        "#",
    ]
    if section:
        head += [ln for ln in as_comments(section).splitlines()]
        head.append("#")
    info = {
        "number": number,
        "digest": rec.digest or "",
        "seed": seed,
        "stream": stream,
        "section": section,
        "evaluation": evaluation,
        "moe": False,
        "dataflow": None,
        "expert_files": [],
    }
    if is_moe_mapping(
        recipe
    ):  # a mixture of experts: a mergekit-moe configuration (and its merged experts)
        text, recipe, files = moe_export(recipe, head, out or Path("best.yml"))
        return text, recipe, {**info, "moe": True, "expert_files": files}
    if is_dataflow_mapping(recipe):  # a path: a passthrough recipe (and its merged sources)
        text, recipe, files, cand = dataflow_export(recipe, head, out or Path("best.yml"))
        return text, recipe, {**info, "dataflow": cand, "expert_files": files}
    text = "\n".join(head) + "\n" + dump_yaml(recipe)
    parse_recipe(yaml.safe_load(text), "exported recipe")  # what we write must load as a recipe
    return text, recipe, info


def _check_dir(what: str, d: Path, force: bool) -> None:
    if d.exists() and not d.is_dir():
        raise EvomergeError(f"{what}: exists and is not a directory")
    if d.exists() and any(d.iterdir()) and not force:
        raise EvomergeError(f"{what}: directory is not empty (pass --force to replace it)")
    AtomicDir(d, force=force)  # checks (creating nothing) that it can be made there


def main_export(args: Any) -> int:
    """``evomerge export space.yml [--trial N] -o best.yml [--merge OUT_DIR]``.

    A refusal leaves every file as it was: the outputs are checked before the study is read, the
    merged experts' once they are known, and the recipe files this run created are removed again
    when the merge fails.
    """
    paths = locate(args.space, study=args.study, storage=args.storage, results_dir=args.results_dir)
    out = Path(args.output)
    _check_file(out, args.force)
    if args.merge:
        _check_dir(f"--merge {args.merge}", Path(args.merge), args.force)
    study = load_study(paths)
    text, recipe, info = export_recipe(study, trial=args.trial, space_file=args.space, out=out)
    kind = "merged source" if info["dataflow"] is not None else "merged expert"
    # Every file and directory this export writes is checked before the first is written.
    for f in info["expert_files"]:
        _check_file(f.recipe_path, args.force)
        if args.merge:
            _check_dir(f"{kind} {f.model_dir}", f.model_dir, args.force)
    files = [f.recipe_path for f in info["expert_files"]] + [out]
    dirs = [f.model_dir for f in info["expert_files"]] if args.merge else []
    created = [p for p in files + dirs if not p.exists()]
    for f in info["expert_files"]:
        _atomic_write(f.recipe_path, f.text, args.force)
    _atomic_write(out, text, args.force)
    print(
        f"wrote {out}: trial {info['number']} of study {paths.name}"
        + "".join(f"; {kind} recipe {f.recipe_path}" for f in info["expert_files"])
    )
    for line in info["evaluation"]:
        print(f"  {line}")
    try:
        differs = _merge(args, recipe, text, info)
    except BaseException:
        for p in created:  # the merge failed: the export leaves nothing of its own behind
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        raise
    if differs:
        raise EvomergeError(differs)
    return 0


def _merge(args: Any, recipe: Any, text: str, info: dict[str, Any]) -> str | None:
    """Merge the exported recipe into ``--merge`` (nothing without it); why the merged tensors
    differ from the trial's, or None when they are the same."""
    if args.merge and info["moe"]:
        _merge_parts(args, info, "merged expert")
        built = moe_to_disk(
            recipe,
            args.merge,
            device=args.device,
            seed=info["seed"],
            force=args.force,
            config_text=text,
            card_extra=info["section"],
        )
        same = built.digest == info["digest"]
        print(
            f"built the mixture into {args.merge} in {built.seconds:.1f}s; hash {built.digest[:16]} "
            + ("matches the trial" if same else f"DIFFERS from the trial's {info['digest'][:20]}")
        )
        if not same:
            return f"--merge: the rebuilt mixture differs from trial {info['number']}'s ({built.digest[:20]} vs {info['digest'][:20]})"
    elif args.merge and info["dataflow"] is not None:
        return _build_dataflow(args, recipe, text, info)
    elif args.merge:
        # CUDA trials record a fingerprint of their tensors (evomerge.engine.hashes), CPU trials a
        # sha256. The re-merge is checked against whichever the trial holds.
        fp = is_fingerprint(info["digest"])
        result = merge_to_disk(
            recipe,
            args.merge,
            device=args.device,
            seed=info["seed"],
            force=args.force,
            card_extra=info["section"],
            recipe_text=text,
            stream=info["stream"],
            fingerprint=fp,
        )
        got = result.fingerprint if fp else result.digest
        same = got == info["digest"]
        print(
            f"merged into {args.merge} in {result.seconds:.1f}s; tensor hash {result.digest[:16]} "
            + (f"(fingerprint {got[:20]}) " if fp else "")
            + ("matches the trial" if same else f"DIFFERS from the trial's {info['digest'][:20]}")
        )
        if not same:
            return f"--merge: the re-merged tensors differ from trial {info['number']}'s ({got[:20]} vs {info['digest'][:20]})"
    return None


def _merge_parts(args: Any, info: dict[str, Any], what: str) -> None:
    """Merge the recipe files an export wrote beside its own (a mixture's merged experts, a path's
    merged sources) into the directories it names."""
    for f in info["expert_files"]:
        merge_to_disk(
            f.recipe_path,
            f.model_dir,
            device=args.device,
            seed=info["seed"],
            force=args.force,
            stream=info["stream"],
        )
        print(f"{what} into {f.model_dir}")


def _build_dataflow(
    args: Any, recipe: dict[str, Any], text: str, info: dict[str, Any]
) -> str | None:
    """``--merge`` of a data-flow trial: its merged sources, the passthrough recipe, and the check
    that the built tensors are those the trial's path computed with (bit for bit); why they differ,
    or None when they are the same."""
    _merge_parts(args, info, "merged source")
    result = merge_to_disk(
        recipe,
        args.merge,
        device=args.device,
        seed=info["seed"],
        force=args.force,
        card_extra=info["section"],
        recipe_text=text,
    )
    cand = info["dataflow"]
    n, worst = compare_built(cand, source_dirs(cand, info["expert_files"]), Path(args.merge))
    print(
        f"built the path into {args.merge} in {result.seconds:.1f}s; "
        + (
            f"its {n} tensors are the path's of trial {info['number']} (each step's weights times its output scale)"
            if worst == 0.0
            else f"DIFFERS from trial {info['number']}'s path by up to {worst:.3g}"
        )
    )
    if worst != 0.0:
        return f"--merge: the built tensors differ from trial {info['number']}'s path (largest difference {worst:.3g})"
    return None
