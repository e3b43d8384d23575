"""How the flags are shown: one letter per flag in results tables, their legend, and the markdown
"Contamination and evaluation" section of model cards and exported recipes.

Results tables are read back from CSV, so a flag cell may be ``True``, ``"True"``, ``"yes"``,
``1`` or NaN; :func:`flag_raised` is the one reading of such a cell.

Example::

    flag_marks({"merge_lineage": True, "overfit": "True"})   # 'LO'
    md = render_contamination_section(assessment, search=(0.81, 0.03), unseen=(0.70, 0.04))
    recipe_head = as_comments(md)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from evomerge.contamination.rules import FLAG_COLUMNS, Assessment, overfit_columns

__all__ = ["flag_raised", "flag_marks", "legend", "render_contamination_section", "as_comments"]

_MARKS = {
    "merge_lineage": "L",
    "eval_data_in_training": "D",
    "public_benchmark_search": "B",
    "overfit": "O",
    "memorization_probe": "M",
}
_MEANING = {
    "merge_lineage": "a source model is a merge",
    "eval_data_in_training": "an eval dataset is in a source card's datasets",
    "public_benchmark_search": "searched on a public benchmark",
    "overfit": "search score > test (else validation) score + 2 SE",
    "memorization_probe": "Min-K%++ memorization probe",
}


def flag_raised(value: Any) -> bool:
    """Is a flag cell raised? Accepts bools, ``"True"``/``"yes"``/``"1"`` (a CSV read back),
    numbers; NaN, empty and anything else is not raised."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    if isinstance(value, float) and math.isnan(value):
        return False
    try:
        return bool(value)
    except (TypeError, ValueError):
        return False


def flag_marks(row: Mapping[str, Any]) -> str:
    """One letter per raised flag of a results row, e.g. ``"LO"`` (see :func:`legend`)."""
    return "".join(_MARKS[c] for c in FLAG_COLUMNS if flag_raised(row.get(c)))


def legend() -> str:
    """The one-line legend ``evomerge results`` prints under the table."""
    return "flags: " + ", ".join(f"{_MARKS[c]} = {c} ({_MEANING[c]})" for c in FLAG_COLUMNS)


def render_contamination_section(
    assessment: Assessment,
    *,
    search: tuple[float, float] | None = None,
    unseen: tuple[float, float] | None = None,
    unseen_split: str = "test",
    evaluation: Sequence[str] = (),
    probe: Mapping[str, Any] | None = None,
    level: int = 2,
) -> str:
    """Markdown "Contamination and evaluation" section for a model card or an export.

    Args:
        assessment: from :func:`~evomerge.contamination.rules.assess`.
        search: the exported model's ``(score, standard error)`` on the search tasks.
        unseen: the same on items the search did not score (``None``: none was scored), for
            the overfit flag: its test score where it has one, else its validation score.
        unseen_split: which items ``unseen`` comes from ("test", "validation").
        evaluation: lines (markdown, without the bullet) saying which items chose the model and
            which scored it; default: the scores above.
        probe: ``ProbeResult.columns()`` from :mod:`evomerge.contamination.probe`, or ``None`` if not run.
        level: heading level of the section title.
    Returns:
        Markdown text ending with a newline.
    """
    cols = assessment.columns()
    if search is not None and unseen is not None:
        cols.update(overfit_columns(search[0], search[1], unseen[0], unseen[1], unseen_split))
    else:
        cols.update(
            {"overfit": False, "overfit_evidence": "not computed (no score on unseen items)"}
        )
    if probe is not None:
        cols.update(
            {k: probe.get(k) for k in ("memorization_probe", "memorization_probe_evidence")}
        )
    h = "#" * level
    lines = [
        f"{h} Contamination and evaluation",
        "",
        "Flags measured by evomerge; a raised flag marks a risk, with its evidence.",
        "",
    ]
    for c in FLAG_COLUMNS:
        if c == "memorization_probe" and probe is None:
            lines.append(f"- `{c}`: not run (opt-in: `--probe-contamination`)")
            continue
        state = "**raised**" if flag_raised(cols.get(c)) else "not raised"
        ev = cols.get(f"{c}_evidence") or ""
        lines.append(f"- `{c}`: {state}" + (f": {ev}" if ev else ""))
    lines += ["", f"{h}# Parents and their lineage", ""]
    for s in assessment.sources:
        line = f"- {s.chain()}"
        if s.merges():
            line += ". Merge evidence: " + "; ".join(
                f"{n.model}: {', '.join(n.evidence)}" for n in s.merges()
            )
        if s.datasets:
            line += ". Card datasets: " + ", ".join(s.datasets)
        notes = [n for n in s.notes if n != "not available locally"]
        lines.append(line + (". Notes: " + "; ".join(notes) if notes else ""))
    lines += [
        "",
        f"{h}# Tasks",
        "",
        "- Searched on: " + (", ".join(assessment.search_tasks) or "(none)"),
        "- Holdout (validation and test items): "
        + (", ".join(assessment.holdout_tasks) or "(none)"),
    ]
    if not evaluation:
        evaluation = [f"Search score: {search[0]:.4f} ± {search[1]:.4f}"] if search else []
        evaluation.append(
            f"{unseen_split.capitalize()} score: {unseen[0]:.4f} ± {unseen[1]:.4f}"
            if unseen is not None
            else f"{unseen_split.capitalize()} score: not measured"
        )
    lines += [f"- {e}" for e in evaluation]
    return "\n".join(lines) + "\n"


def as_comments(markdown: str) -> str:
    """Prefix every line with ``# `` so that a section can head an exported YAML recipe."""
    return "".join(f"# {ln}".rstrip() + "\n" for ln in markdown.splitlines())
