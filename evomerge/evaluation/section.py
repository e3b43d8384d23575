"""The ``evaluate:`` section of a search space: :func:`parse_evaluate` turns it into an
:class:`~evomerge.evaluation.base.EvalConfig`, checking task names, the include path and
search/holdout disjointness without downloading anything."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, did_you_mean
from evomerge.evaluation.base import SCORERS, VALIDATION, EvalConfig, TaskSpec
from evomerge.evaluation.tasks import (
    doc_ids,
    get_task_dict,
    leaf_tasks,
    manager_for,
    task_manager,
    texts_of,
)
from evomerge.schemes import known_refs, resolve, scheme_of

__all__ = ["PRESETS", "parse_evaluate", "check_tasks_of"]

# Public benchmark bundles. Names were checked against lm-eval 0.4.13's TaskManager.
PRESETS: dict[str, tuple[tuple[str, str, int], ...]] = {
    # The Open LLM Leaderboard (v1) settings.
    "open_llm_v1": (
        ("arc_challenge", "acc_norm", 25),
        ("hellaswag", "acc_norm", 10),
        ("mmlu", "acc", 5),
        ("truthfulqa_mc2", "acc", 0),
        ("winogrande", "acc", 5),
        ("gsm8k", "exact_match", 5),
    ),
    # The Nous suite used on merge leaderboards: AGIEval (English), the GPT4All set, TruthfulQA and
    # the BIG-bench tasks of that suite (multiple-choice variants), all zero-shot.
    "nous": (
        ("agieval_nous", "acc_norm", 0),
        ("hellaswag", "acc_norm", 0),
        ("openbookqa", "acc_norm", 0),
        ("winogrande", "acc", 0),
        ("arc_easy", "acc", 0),
        ("arc_challenge", "acc_norm", 0),
        ("boolq", "acc", 0),
        ("piqa", "acc_norm", 0),
        ("truthfulqa_mc2", "acc", 0),
    )
    + tuple(
        (f"bigbench_{t}_multiple_choice", "acc", 0)
        for t in (
            "causal_judgment",
            "date_understanding",
            "disambiguation_qa",
            "geometric_shapes",
            "logical_deduction",
            "movie_recommendation",
            "navigate",
            "reasoning_about_colored_objects",
            "ruin_names",
            "salient_translation_error_detection",
            "snarks",
            "sports_understanding",
            "temporal_sequences",
            "tracking_shuffled_objects",
        )
    ),
}

_KEYS = {
    "include_path",
    "tasks",
    "preset",
    "limit",
    "holdout",
    "batch_size",
    "scorer",
    "chat_template",
}
_TASK_KEYS = {"name", "metric", "weight", "num_fewshot"}
_HOLDOUT_KEYS = {"tasks", "limit", "validation"}


# ----------------------------------------------------------------------------------------- parsing


def _resolve_include(value: Any, file: str, base_dir: Path) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    out: list[str] = []
    for i, v in enumerate(values):
        where = "evaluate.include_path" + (f"[{i}]" if isinstance(value, list) else "")
        if not isinstance(v, str) or not v:
            raise ConfigError(
                file,
                where,
                f"must be a directory path (or a scheme reference such as zoo:demo), got {v!r}",
            )
        scheme = scheme_of(v)
        if scheme is not None:
            resolved = resolve(v)
            if resolved is None or not resolved.is_dir():
                raise ConfigError(
                    file,
                    where,
                    f"unknown {scheme.name} task folder {v!r}"
                    + did_you_mean(v, [r for r in known_refs(v) if "/" not in r]),
                )
            out.append(str(resolved.resolve()))
            continue
        p = base_dir / Path(v).expanduser()  # an absolute path stays as it is
        if not p.is_dir():
            raise ConfigError(file, where, f"directory {v!r} does not exist (looked at {p})")
        out.append(str(p.resolve()))
    return out


def _no_unknown(section: Mapping[Any, Any], keys: set[str], file: str, where: str) -> None:
    unknown = sorted(map(str, set(section) - keys))
    if unknown:
        raise ConfigError(
            file, f"{where}.{unknown[0]}", "unknown key" + did_you_mean(unknown[0], keys)
        )


def _number(value: Any) -> bool:
    """A finite int or float (a bool is neither here)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _int_or_none(value: Any, file: str, where: str, *, minimum: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(file, where, f"must be an integer >= {minimum} or null, got {value!r}")
    return value


def _share(value: Any, file: str, where: str) -> float:
    if not _number(value) or not 0 <= value < 1:
        raise ConfigError(
            file,
            where,
            "must be the share of each holdout task's items that choose among the finalists, "
            f"a number in [0, 1) (0: choose by search score, every holdout item a test item), got {value!r}",
        )
    return float(value)


def _parse_task(entry: Any, file: str, where: str) -> TaskSpec:
    if isinstance(entry, str) and entry:
        return TaskSpec(entry)
    if not isinstance(entry, Mapping):
        raise ConfigError(
            file,
            where,
            f"must be a task name or a mapping with keys {sorted(_TASK_KEYS)}, got {entry!r}",
        )
    _no_unknown(entry, _TASK_KEYS, file, where)
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(file, f"{where}.name", "a task needs a name")
    metric = entry.get("metric", "acc")
    if not isinstance(metric, str) or not metric:
        raise ConfigError(
            file,
            f"{where}.metric",
            f"must be a metric name such as acc or acc_norm, got {metric!r}",
        )
    weight = entry.get("weight", 1.0)
    if not _number(weight) or not weight > 0:
        raise ConfigError(file, f"{where}.weight", f"must be a positive number, got {weight!r}")
    shots = _int_or_none(entry.get("num_fewshot"), file, f"{where}.num_fewshot", minimum=0)
    return TaskSpec(name, metric, float(weight), shots)


def _parse_task_list(value: Any, file: str, where: str) -> list[TaskSpec]:
    if not isinstance(value, list):
        raise ConfigError(
            file, where, f"must be a list of task names or mappings, got {type(value).__name__}"
        )
    specs = [_parse_task(e, file, f"{where}[{i}]") for i, e in enumerate(value)]
    for i, s in enumerate(specs):
        if s.name in {t.name for t in specs[:i]}:
            raise ConfigError(file, f"{where}[{i}]", f"task {s.name!r} is listed twice")
    return specs


def _check_names(specs: list[TaskSpec], where: str, file: str, include_path: list[str]) -> None:
    """Every task name must exist, locally or in lm-eval's own index (names only: no download)."""
    if not specs:
        return
    # the local index when it knows every name; lm-eval's own (seconds to build) only if not
    known = set(manager_for([s.name for s in specs], include_path).all_tasks)
    for i, s in enumerate(specs):
        if s.name not in known:
            raise ConfigError(
                file,
                f"{where}[{i}]",
                f"unknown lm-eval task {s.name!r}" + did_you_mean(s.name, known, show_all=0),
            )


def parse_evaluate(
    section: Mapping[str, Any] | None, file: str, base_dir: Path, *, check_tasks: bool = True
) -> EvalConfig:
    """Parse and validate the ``evaluate:`` section of a search space.

    Args:
        section: the mapping (None: the demo zoo's defaults are *not* implied; an error).
        file: the space file's name, for messages.
        base_dir: directory that relative include paths are resolved against.
        check_tasks: also look the task names up (local ones, then lm-eval's index, which takes
            seconds to build) and compare local holdout items with search items
            (:func:`check_tasks_of`); a space file is parsed without, and the evaluator checks
            them when it loads the tasks.

    Returns:
        The :class:`EvalConfig`.

    Raises:
        ConfigError: unknown key or task, missing include path, bad limit/weight, holdout items that
            overlap search items.
    """
    if section is None:
        raise ConfigError(
            file, "evaluate", "missing: name the tasks (or a preset) that score a candidate"
        )
    if not isinstance(section, Mapping):
        raise ConfigError(file, "evaluate", f"must be a mapping, got {type(section).__name__}")
    _no_unknown(section, _KEYS, file, "evaluate")
    include = _resolve_include(section.get("include_path"), file, Path(base_dir))

    preset = section.get("preset")
    search: list[TaskSpec] = []
    if preset is not None:
        if not isinstance(preset, str):  # a list: one preset, plus tasks: for more
            raise ConfigError(
                file,
                "evaluate.preset",
                f"must be one preset name ({', '.join(PRESETS)}), got {type(preset).__name__}; "
                "add other tasks under evaluate.tasks",
            )
        if preset not in PRESETS:
            raise ConfigError(
                file,
                "evaluate.preset",
                f"unknown preset {preset!r}" + did_you_mean(str(preset), PRESETS),
            )
        search = [TaskSpec(n, m, 1.0, k) for n, m, k in PRESETS[preset]]
    if section.get("tasks") is not None:
        extra = _parse_task_list(section["tasks"], file, "evaluate.tasks")
        names = {s.name for s in search}
        for i, s in enumerate(extra):
            if s.name in names:
                raise ConfigError(
                    file, f"evaluate.tasks[{i}]", f"task {s.name!r} is already in preset {preset}"
                )
        search += extra
    if not search:
        raise ConfigError(
            file,
            "evaluate.tasks",
            "name at least one task (or a preset: " + ", ".join(PRESETS) + ")",
        )
    limit = _int_or_none(section.get("limit"), file, "evaluate.limit")
    batch_size = _int_or_none(section.get("batch_size", 32), file, "evaluate.batch_size")
    scorer = section.get("scorer", "shared")
    if scorer not in SCORERS:
        raise ConfigError(
            file,
            "evaluate.scorer",
            f"must be one of {', '.join(SCORERS)}, got {scorer!r}"
            + did_you_mean(str(scorer), SCORERS),
        )
    chat = section.get("chat_template", False)
    if not isinstance(chat, bool):
        raise ConfigError(file, "evaluate.chat_template", f"must be true or false, got {chat!r}")

    holdout: list[TaskSpec] = []
    holdout_limit: int | None = None
    validation = VALIDATION
    h = section.get("holdout")
    if h is not None:
        if not isinstance(h, Mapping):
            raise ConfigError(
                file, "evaluate.holdout", "must be a mapping: {tasks: [...]} or {limit: N}"
            )
        _no_unknown(h, _HOLDOUT_KEYS, file, "evaluate.holdout")
        holdout_limit = _int_or_none(h.get("limit"), file, "evaluate.holdout.limit")
        validation = _share(h.get("validation", VALIDATION), file, "evaluate.holdout.validation")
        if h.get("tasks") is not None:
            holdout = _parse_task_list(h["tasks"], file, "evaluate.holdout.tasks")
        elif holdout_limit is None:
            raise ConfigError(
                file,
                "evaluate.holdout",
                "give tasks (separate holdout tasks) or limit (the docs after the search docs)",
            )
        elif limit is None:
            raise ConfigError(
                file,
                "evaluate.holdout.limit",
                "the holdout docs follow the search docs, so evaluate.limit must be set (otherwise search uses every doc and they overlap)",
            )
    cfg = EvalConfig(
        search,
        holdout,
        include,
        limit,
        holdout_limit,
        int(batch_size or 32),
        preset,
        file,
        scorer,
        validation,
        chat_template=chat,
    )
    if check_tasks:
        check_tasks_of(cfg)
    return cfg


def check_tasks_of(cfg: EvalConfig) -> None:
    """Every task name exists (locally or in lm-eval's index; names only, nothing downloaded),
    holdout tasks do not repeat search tasks, and local holdout tasks share no item (prompt and
    gold answer text) with local search tasks.

    Raises:
        ConfigError: naming the file and the task's field.
    """
    preset = PRESETS.get(cfg.preset or "", ())
    # the tasks: list as written (indices in messages), after the preset's
    _check_names(cfg.search[len(preset) :], "evaluate.tasks", cfg.file, cfg.include_path)
    _check_names(cfg.holdout, "evaluate.holdout.tasks", cfg.file, cfg.include_path)
    search_names = {s.name for s in cfg.search}
    for i, s in enumerate(cfg.holdout):
        if s.name in search_names:
            raise ConfigError(
                cfg.file,
                f"evaluate.holdout.tasks[{i}]",
                f"{s.name!r} is also a search task: its holdout items would overlap the search items (use holdout: {{limit: N}} for a later doc range)",
            )
    if not cfg.holdout or not cfg.include_path:  # public tasks are never loaded here
        return
    tm = task_manager(tuple(cfg.include_path), False)
    local = set(tm.all_tasks)
    s_local = [s.name for s in cfg.search if s.name in local]
    h_local = [(i, s.name) for i, s in enumerate(cfg.holdout) if s.name in local]
    if not s_local or not h_local:
        return
    tasks = leaf_tasks(get_task_dict(s_local + [n for _, n in h_local], tm))
    search_texts: dict[str, str] = {}
    for name in s_local:
        for t in texts_of(tasks, name, doc_ids(tasks, name, 0, cfg.limit)):
            search_texts.setdefault(t, name)
    for i, name in h_local:
        for t in texts_of(tasks, name, doc_ids(tasks, name, 0, cfg.holdout_limit)):
            if t in search_texts:
                raise ConfigError(
                    cfg.file,
                    f"evaluate.holdout.tasks[{i}]",
                    f"holdout task {name!r} shares items with search task {search_texts[t]!r} (e.g. {t[:60]!r})",
                )
