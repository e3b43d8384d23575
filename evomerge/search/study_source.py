"""A finished study's best trial as a merge recipe: the first stage of a two-stage search.

A data-flow space may name a parameter-space study as a source (``{study: demo.yml}``, PS+DFS): the
search reads that study's chosen trial when it starts and runs the layers of its merge. The trial is
the one ``evomerge export`` takes (:func:`~evomerge.search.table.chosen_row`: chosen on search and
validation items), or ``trial: N``; the test items chose nothing in either stage, so the second
stage's test scores stay an honest report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from evomerge.dataflow.candidate import is_dataflow_mapping
from evomerge.dataflow.section import study_sources, with_study_recipe
from evomerge.errors import ConfigError, EvomergeError
from evomerge.moe.config import is_moe_mapping
from evomerge.search.records import StudyRecords
from evomerge.search.storage import load_study, locate
from evomerge.search.table import chosen_row, trials_frame
from evomerge.space import Space

__all__ = ["resolve_study_sources", "study_recipe"]


def study_recipe(
    space_file: str | Path,
    *,
    trial: int | None,
    storage: str | None,
    results_dir: str | Path,
    file: str,
    fld: str,
) -> tuple[int, dict[str, Any]]:
    """The recipe of a finished study's trial.

    Args:
        space_file: the study's space file (its study name and storage are read from it).
        trial: a trial number; None: the study's chosen trial (what ``evomerge export`` takes).
        storage: the study's storage URL instead of the space's.
        results_dir: where default storages live.
        file, fld: name the referring space file and field in messages.

    Returns:
        ``(trial number, recipe mapping)``.

    Raises:
        ConfigError: no such study, no completed trial, no such trial, or a trial that is not a
            merge (a mixture of experts, a data-flow path).
    """
    try:
        paths = locate(space_file, storage=storage, results_dir=results_dir)
        study = load_study(paths)
    except EvomergeError as e:
        raise ConfigError(file, fld, str(e)) from None
    df = trials_frame(study)
    if trial is None:
        row = chosen_row(df)
        if row is None:
            raise ConfigError(
                file,
                fld,
                f"study {paths.name!r} has no completed trial yet; finish `evomerge search {space_file}` first",
            )
        number = int(row["number"])
    else:
        number = trial
        if not ((df["state"] == "COMPLETE") & df["number"].eq(number).fillna(False)).any():
            raise ConfigError(
                file,
                fld.rsplit(".", 1)[0] + ".trial",
                f"study {paths.name!r} has no completed trial {number}",
            )
    rec = StudyRecords(study).trial(study.trials[number])
    recipe = yaml.safe_load(rec.recipe or "{}")
    if not isinstance(recipe, Mapping) or is_moe_mapping(recipe) or is_dataflow_mapping(recipe):
        raise ConfigError(
            file,
            fld,
            f"trial {number} of study {paths.name!r} is not a merge recipe (a source must be a model or a merge)",
        )
    return number, dict(recipe)


def resolve_study_sources(space: Space, *, results_dir: str | Path, log: Any = None) -> Space:
    """The space with every study source of its ``dataflow:`` section resolved to its trial's
    recipe (a new space; the parsed one is left as it is).

    Raises:
        ConfigError: see :func:`study_recipe`.
    """
    section = space.tree["dataflow"]
    for i, s in study_sources(section):
        number, recipe = study_recipe(
            s["study"],
            trial=s["trial"],
            storage=s["storage"],
            results_dir=results_dir,
            file=space.file,
            fld=f"dataflow.sources[{i}].study",
        )
        section = with_study_recipe(section, i, recipe, number)
        if log is not None:
            log(f"dataflow source {s['name']}: trial {number} of the study of {s['study']}")
    return dataclasses.replace(space, tree={**space.tree, "dataflow": section})
