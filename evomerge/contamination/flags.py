"""Contamination and overfitting flags: measure the risk and show it next to every score.

evomerge does not refuse to search on public benchmarks (mergekit-evolve does); it measures
and flags, so that the results table, the report, the exported recipe and the model card
carry the evidence. Five flags, each a column with a companion ``<flag>_evidence`` column:

``merge_lineage``
    A source model, or an ancestor reachable from it, is itself a merge. Evidence is read
    from the model directory only: card front-matter ``tags`` (:data:`MERGE_TAGS`),
    ``base_model_relation: merge``, a ``base_model:`` list of two or more parents, a
    ``mergekit_config.yml``, or card text that says so ("is a merge of", "merged using
    mergekit"). Parents are followed recursively where they exist locally (a directory, or
    a hub id already in the local Hugging Face cache; never the network), cycle-safe and
    depth-limited; :meth:`Lineage.chain` shows the ancestor chain.
``eval_data_in_training``
    A card ``datasets:`` entry of a source or of one of its ancestors names a dataset that
    an evaluation task reads (lm-eval ``dataset_path``; for local ``json``/``csv`` tasks,
    the data file names). Names are compared without case, organisation prefix or file
    extension ("allenai/ai2_arc" matches "ai2_arc"). A card does not say which split was
    used, so this marks a risk, not a proof.
``public_benchmark_search``
    Study level: a search task is a public benchmark (:data:`PUBLIC_BENCHMARKS`, their
    ``tiny*`` variants and ``leaderboard_*``), by name or by its dataset.
``overfit``
    A finalist's search score exceeds its holdout score by more than twice their combined
    standard error: ``search - holdout > 2 * sqrt(se_search**2 + se_holdout**2)``.
``memorization_probe``
    Opt-in Min-K%++ probe; see :mod:`evomerge.contamination.probe`.

Typical use by the study::

    a = assess(model_refs, search_tasks, holdout_tasks, include_path=task_dir)
    for line in a.warnings(): log.warning(line)          # loud, at start
    row.update(a.columns())                              # every trials.csv row
    row.update(overfit_columns(s, s_se, h, h_se))        # finalists
    card_md = render_contamination_section(a, search=(s, s_se), holdout=(h, h_se))
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

__all__ = [
    "FLAG_COLUMNS", "assessment_to_dict", "assessment_from_dict", "MERGE_TAGS", "PUBLIC_BENCHMARKS", "Card", "Lineage", "DatasetHit",
    "OverfitResult", "Assessment", "read_card", "default_resolve", "model_lineage",
    "task_datasets", "eval_data_in_training", "public_benchmark_tasks", "overfit",
    "overfit_columns", "source_flags", "assess", "flag_raised", "flag_marks", "legend",
    "render_contamination_section", "as_comments",
]

FLAG_COLUMNS = ("merge_lineage", "eval_data_in_training", "public_benchmark_search",
                "overfit", "memorization_probe")
_MARKS = {"merge_lineage": "L", "eval_data_in_training": "D", "public_benchmark_search": "B",
          "overfit": "O", "memorization_probe": "M"}
_MEANING = {"merge_lineage": "a source model is a merge",
            "eval_data_in_training": "an eval dataset is in a source card's datasets",
            "public_benchmark_search": "searched on a public benchmark",
            "overfit": "search score > holdout + 2 SE",
            "memorization_probe": "Min-K%++ memorization probe"}
MERGE_TAGS = ("merge", "mergekit", "lazymergekit", "moerge", "frankenmerge", "evomerge")
PUBLIC_BENCHMARKS = ("arc", "ai2_arc", "hellaswag", "mmlu", "hendrycks_test", "gsm8k",
                     "winogrande", "truthfulqa", "truthful_qa", "bigbench", "bbh", "agieval",
                     "piqa", "openbookqa", "gpqa", "ifeval", "musr",
                     # further widely reported lm-eval benchmarks
                     "lambada", "boolq", "sciq", "triviaqa", "commonsense_qa", "social_iqa",
                     "siqa", "logiqa", "mathqa", "minerva_math", "hendrycks_math", "humaneval",
                     "mbpp", "squadv2")
_BENCH_RE = re.compile(r"^(?:tiny)?(?:" + "|".join(PUBLIC_BENCHMARKS) + r")(?:$|[_\-.:])", re.I)
_BENCH_ORGS = ("tinybenchmarks", "open-llm-leaderboard")
_MERGE_TEXT = [re.compile(p, re.I) for p in (
    r"\b(?:is|was) an? (?:[\w\-/]+ ){0,3}merge of\b",
    r"\bwas merged (?:using|with|via)\b",
    r"\bmerged (?:\w+ ){0,3}(?:using|with|via) \[?mergekit\b",
)]
_MERGEKIT_FILES = ("mergekit_config.yml", "mergekit_moe_config.yml")
_LOCAL_DATA_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
_DATA_EXTS = (".gz", ".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".tsv")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(?:/[\w.\-]+)?$")


class Card(NamedTuple):
    """A model card: ``meta`` (YAML front matter), ``body`` (markdown) and ``problem``
    (``None``, ``"no model card"`` or ``"unreadable card: ..."``)."""

    meta: dict[str, Any]
    body: str
    problem: str | None


@dataclass(frozen=True)
class Lineage:
    """What a model directory says about where the model came from.

    ``model`` is the reference as written (a path or hub id); ``parents`` are the references
    found in its card/config; ``ancestors`` their own lineages, in the same order. ``notes``
    holds what could not be checked ("not available locally", "no model card", "cycle",
    "depth limit reached", "unreadable card: ...").
    """

    model: str
    path: str | None = None
    is_merge: bool = False
    evidence: tuple[str, ...] = ()
    parents: tuple[str, ...] = ()
    ancestors: tuple[Lineage, ...] = ()
    relation: str = ""
    datasets: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.path is not None

    def walk(self) -> Iterator[Lineage]:
        """This node, then every ancestor depth-first."""
        yield self
        for a in self.ancestors:
            yield from a.walk()

    def merges(self) -> list[Lineage]:
        """Every node of the lineage (this one included) that is a merge."""
        return [n for n in self.walk() if n.is_merge]

    def chain(self) -> str:
        """E.g. ``A <- merge of (B <- merge of (C, D), E [not available locally])``."""
        shown = [n for n in self.notes if n in ("not available locally", "cycle",
                                                 "depth limit reached")]
        head = self.model + (f" [{'; '.join(shown)}]" if shown else "")
        if not self.ancestors:
            return head
        label = "merge" if self.is_merge else (self.relation or "fine-tune")
        return f"{head} <- {label} of ({', '.join(a.chain() for a in self.ancestors)})"


class DatasetHit(NamedTuple):
    """A card ``datasets:`` entry that an evaluation task also reads."""

    source: str        # the source model of the search
    via: str           # the model whose card lists the dataset (source itself or an ancestor)
    card_dataset: str  # the entry as written in the card
    task: str          # the evaluation task (as requested)
    task_dataset: str  # the dataset the task reads


class OverfitResult(NamedTuple):
    flag: bool
    gap: float        # search - holdout
    threshold: float  # 2 * sqrt(se_search**2 + se_holdout**2)


# ----------------------------------------------------------------------------- cards
def read_card(model_dir: str | os.PathLike[str]) -> Card:
    """Read ``README.md`` of a model directory; never raises on a bad or missing card.

    Args:
        model_dir: the model directory.
    Returns:
        :class:`Card`; ``problem`` says why ``meta`` is empty when the card is missing or
        its front matter cannot be parsed.
    """
    path = Path(model_dir) / "README.md"
    if not path.is_file():
        return Card({}, "", "no model card")
    try:
        text = path.read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
    except OSError as err:
        return Card({}, "", f"unreadable card: {type(err).__name__}")
    m = re.match(r"\s*---[ \t]*\r?\n(.*?)^---[ \t]*$\r?\n?", text, re.S | re.M)
    if not m:
        if text.lstrip().startswith("---"):
            return Card({}, text, "unreadable card: front matter is not closed")
        return Card({}, text, None)
    body = text[m.end():]
    try:
        meta = yaml.safe_load(m.group(1))
    except (yaml.YAMLError, ValueError) as err:
        mark = getattr(err, "problem_mark", None)
        first = text.count("\n", 0, m.start(1)) + 1  # card line of the front matter's line 0
        where = f" (line {mark.line + first})" if mark is not None else ""
        return Card({}, body, f"unreadable card: front matter is not valid YAML{where}")
    if meta is None:
        return Card({}, body, None)
    if not isinstance(meta, dict):
        return Card({}, body, "unreadable card: front matter is not a mapping")
    return Card(meta, body, None)


def _strings(value: Any) -> list[str]:
    """A YAML scalar-or-list as a list of non-empty strings."""
    items = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in items if isinstance(v, (str, int, float)) and str(v).strip()]


def _mergekit_parents(cfg: Any) -> list[str]:
    """Model references named anywhere a mergekit (or mergekit-moe) config names models."""
    if not isinstance(cfg, dict):
        return []
    out: list[str] = []

    def add(ref: Any) -> None:
        if isinstance(ref, dict):
            ref = ref.get("model", ref.get("path"))
            return add(ref)
        if isinstance(ref, str) and ref.strip():
            out.append(ref.strip())

    add(cfg.get("base_model"))
    for entry in cfg.get("models") or []:
        add(entry.get("model") if isinstance(entry, dict) else entry)
    for sl in cfg.get("slices") or []:
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            add(src.get("model") if isinstance(src, dict) else None)
    for ex in cfg.get("experts") or []:
        add(ex.get("source_model") if isinstance(ex, dict) else None)
    return out


def _inspect_dir(path: Path) -> dict[str, Any]:
    """Merge evidence, parents, relation, card datasets and notes of one model directory."""
    card = read_card(path)
    meta, evidence, notes = card.meta, [], []
    if card.problem:
        notes.append(card.problem)
    tags = [t for t in _strings(meta.get("tags")) if t.lower() in MERGE_TAGS]
    if tags:
        evidence.append("tags: " + ", ".join(tags))
    relation = str(meta.get("base_model_relation") or "").strip().lower()
    if relation == "merge":
        evidence.append("base_model_relation: merge")
    parents = _strings(meta.get("base_model"))
    if len(parents) >= 2:
        evidence.append(f"base_model lists {len(parents)} parents")
    for name in _MERGEKIT_FILES:
        f = path / name
        if f.is_file():
            evidence.append(name)
            try:
                parents += _mergekit_parents(yaml.safe_load(f.read_text(encoding="utf-8")))
            except (OSError, yaml.YAMLError, ValueError, UnicodeDecodeError):
                notes.append(f"unreadable {name}")
    for rx in _MERGE_TEXT:
        m = rx.search(card.body)
        if m:
            evidence.append(f'card text: "{" ".join(m.group(0).split())}"')
            break
    if evidence and not parents:  # lazymergekit cards list the parents as "org/name" tags
        parents = [t for t in _strings(meta.get("tags")) if "/" in t]
    unique = list(dict.fromkeys(p for p in parents if p))
    return {"is_merge": bool(evidence), "evidence": tuple(evidence), "parents": tuple(unique),
            "relation": relation, "datasets": tuple(_strings(meta.get("datasets"))),
            "notes": tuple(notes)}


# ----------------------------------------------------------------------------- lineage
def default_resolve(ref: str, base_dir: str | os.PathLike[str] | None = None, *,
                    cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Find a model reference on this machine, never on the network.

    A path is tried as is, then relative to ``base_dir`` (the directory of the model whose
    card names it), its parent directory, and the working directory. Otherwise a hub id
    (``org/name``, optionally ``@revision``; a mergekit ``+lora`` suffix is ignored) is
    looked up in the local Hugging Face cache only.

    Args:
        ref: the reference as written in a recipe or card.
        base_dir: directory to resolve relative paths against first.
        cache_dir: Hugging Face hub cache to look in (default: the user's cache).
    Returns:
        The model directory, or ``None`` when it is not available locally.
    """
    raw = ref.strip()
    if raw.startswith("zoo:"):  # the demo zoo (built by then: the search opened its models)
        from evomerge.zoo import resolve_zoo_ref

        found = resolve_zoo_ref(raw)
        return Path(found) if found else None
    name = raw.split("+", 1)[0] if not Path(raw).expanduser().exists() else raw
    p = Path(name).expanduser()
    roots = [Path(base_dir), Path(base_dir).parent] if base_dir is not None else []
    for cand in ([p] if p.is_absolute() else [r / p for r in roots] + [Path.cwd() / p]):
        if cand.is_dir():
            return cand
    repo, _, rev = name.partition("@")
    if p.is_absolute() or not _HUB_ID.match(repo):
        return None
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(repo, revision=rev or None, cache_dir=cache_dir,
                                 local_files_only=True)
    except Exception:  # not cached, invalid id, offline errors: all mean "not here"
        return None
    return Path(snap) if isinstance(snap, str) and Path(snap).is_dir() else None


Resolver = Callable[..., "Path | None"]


def model_lineage(ref: str, resolve: Resolver = default_resolve, *,
                  base_dir: str | os.PathLike[str] | None = None, max_depth: int = 8,
                  max_nodes: int = 256) -> Lineage:
    """Lineage of one model, following parents recursively where they are available locally.

    Args:
        ref: a model directory or hub id.
        resolve: ``resolve(ref, base_dir) -> Path | None``; must not touch the network.
        base_dir: directory that relative ``ref`` is resolved against first.
        max_depth: parents followed at most this many levels up.
        max_nodes: stop expanding after this many nodes (huge or pathological trees).
    Returns:
        The :class:`Lineage` tree; unavailable parents are leaves noted "not available
        locally", a parent that is its own ancestor is a leaf noted "cycle".
    """
    budget = [max_nodes]

    def visit(ref: str, base: Path | None, depth: int, seen: frozenset[str]) -> Lineage:
        budget[0] -= 1
        path = resolve(ref, base)
        if path is None:
            return Lineage(ref, notes=("not available locally",))
        path = Path(path)
        key = str(path.resolve())
        if key in seen:
            return Lineage(ref, path=str(path), notes=("cycle",))
        info = _inspect_dir(path)
        parents = [p for p in info["parents"] if p != ref]
        notes = info["notes"]
        if parents and (depth <= 0 or budget[0] <= 0):
            return Lineage(ref, str(path), info["is_merge"], info["evidence"], tuple(parents),
                           (), info["relation"], info["datasets"], notes + ("depth limit reached",))
        ancestors = tuple(visit(p, path, depth - 1, seen | {key}) for p in parents)
        return Lineage(ref, str(path), info["is_merge"], info["evidence"], tuple(parents),
                       ancestors, info["relation"], info["datasets"], notes)

    return visit(ref, Path(base_dir) if base_dir is not None else None, max_depth, frozenset())


# ----------------------------------------------------------------------------- tasks
def _task_manager(include_path: tuple[str, ...], include_defaults: bool) -> Any:
    # One cached lm-eval index for the whole process, shared with the evaluator (building it
    # reads ~15k task YAMLs).
    from evomerge.evaluation.lmeval import task_manager

    return task_manager(include_path, include_defaults)


def _leaf_datasets(cfg: Mapping[str, Any]) -> set[str]:
    """Datasets one lm-eval task config reads: the hub id, or the evaluation data files."""
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or not path.strip():
        return set()
    if path not in _LOCAL_DATA_BUILDERS:
        return {path}
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        splits = [cfg.get("test_split"), cfg.get("validation_split")]
        picked = [files[s] for s in splits if isinstance(s, str) and s in files]
        files = picked or list(files.values())
    return {f for f in _flatten(files) if f} or {path}


def _flatten(value: Any) -> Iterator[str]:
    if isinstance(value, (str, os.PathLike)):
        yield str(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)


def _expand(name_or_cfg: Any, managers: Sequence[Any], seen: set[str]) -> set[str]:
    """Datasets of a task, group (recursively) or tag, looked up in the first manager that knows it."""
    if isinstance(name_or_cfg, dict):  # inline task or group inside a group config
        sub = name_or_cfg.get("task")
        if "group" in name_or_cfg or isinstance(sub, list):
            return set().union(*(_expand(s, managers, seen) for s in _flatten_tasks(sub)))
        if isinstance(sub, str) and "dataset_path" not in name_or_cfg:
            return _expand(sub, managers, seen)
        return _leaf_datasets(name_or_cfg)
    name = str(name_or_cfg)
    if name in seen:
        return set()
    seen.add(name)
    entry = next((m.task_index[name] for m in managers if name in m.task_index), None)
    kind = getattr(getattr(entry, "kind", None), "name", "")
    cfg = getattr(entry, "cfg", None) or {}
    if kind == "TAG":
        return set().union(set(), *(_expand(t, managers, seen) for t in sorted(entry.tags)))
    if kind == "GROUP":
        return set().union(set(), *(_expand(t, managers, seen)
                                    for t in _flatten_tasks(cfg.get("task"))))
    return _leaf_datasets(cfg)


def _flatten_tasks(value: Any) -> list[Any]:
    return [v for v in (value if isinstance(value, list) else [value]) if v]


def task_datasets(task_names: Iterable[str], include_path: Any = None, *,
                  task_manager: Any = None) -> dict[str, set[str]]:
    """The datasets each lm-eval task reads, from its YAML config (no data is downloaded).

    Groups and tags are expanded to their member tasks. Hub datasets are given as their
    ``dataset_path`` (e.g. ``allenai/ai2_arc``); local ``json``/``csv``/... tasks as the
    file names of their evaluation split (all files when the split cannot be told).

    Args:
        task_names: lm-eval task, group or tag names.
        include_path: directory (or list) of extra task YAMLs, as given to lm-eval.
        task_manager: an ``lm_eval.tasks.TaskManager`` to use instead of building one.
    Returns:
        ``{task: {dataset, ...}}``; an unknown task maps to an empty set.
    """
    names = list(dict.fromkeys(task_names))
    if task_manager is not None:
        managers = [task_manager]
    else:
        paths = tuple(str(p) for p in _flatten(include_path or []))
        managers = [_task_manager(paths, False)] if paths else []
        if not all(any(n in m.task_index for m in managers) for n in names):
            managers.append(_task_manager((), True))
    return {n: _expand(n, managers, set()) for n in names}


def _norm_dataset(name: str) -> str:
    """Comparable dataset name: no case, organisation/directory prefix or file extension."""
    s = name.strip().replace("\\", "/").rstrip("/").lower().rsplit("/", 1)[-1]
    while True:
        ext = next((e for e in _DATA_EXTS if s.endswith(e) and len(s) > len(e)), None)
        if ext is None:
            break
        s = s[: -len(ext)]
    s = s.replace("-", "_")
    return {"hendrycks_test": "mmlu", "truthful_qa": "truthfulqa"}.get(s, s)


def _dataset_hits(source: Lineage, datasets: Mapping[str, Iterable[str]]) -> list[DatasetHit]:
    hits: list[DatasetHit] = []
    for node in source.walk():
        for entry in node.datasets:
            key = _norm_dataset(entry)
            for task, used in datasets.items():
                for ds in sorted(used):
                    if _norm_dataset(ds) == key:
                        hits.append(DatasetHit(source.model, node.model, entry, task, ds))
    return list(dict.fromkeys(hits))


def eval_data_in_training(model_refs: Iterable[str], datasets: Mapping[str, Iterable[str]],
                          resolve: Resolver = default_resolve) -> dict[str, list[DatasetHit]]:
    """Card ``datasets:`` entries (of each model and its local ancestors) that tasks read.

    Args:
        model_refs: source models of the search.
        datasets: ``{task: datasets}`` as returned by :func:`task_datasets`.
        resolve: see :func:`model_lineage`.
    Returns:
        ``{model: [DatasetHit, ...]}`` with an entry (possibly empty) for every model.
    """
    return {ref: _dataset_hits(model_lineage(ref, resolve), datasets) for ref in model_refs}


def _is_benchmark_dataset(ds: str) -> bool:
    org = ds.split("/", 1)[0].lower() if _HUB_ID.match(ds) and "/" in ds else ""
    return bool(_BENCH_RE.match(_norm_dataset(ds))) or org in _BENCH_ORGS


def public_benchmark_tasks(task_names: Iterable[str],
                           datasets: Mapping[str, Iterable[str]] | None = None) -> dict[str, str]:
    """Which tasks are public benchmarks, by name or by the dataset they read.

    Args:
        task_names: the search tasks.
        datasets: optional ``{task: datasets}`` (see :func:`task_datasets`), so that a local
            task reading e.g. ``allenai/ai2_arc`` is caught whatever its name.
    Returns:
        ``{task: reason}`` for the flagged tasks only, in input order.
    """
    out: dict[str, str] = {}
    for t in dict.fromkeys(task_names):
        if _BENCH_RE.match(t) or re.match(r"^(?:leaderboard|tinybenchmarks)(?:$|_)", t, re.I):
            out[t] = "public benchmark name"
            continue
        hit = next((d for d in sorted((datasets or {}).get(t, ())) if _is_benchmark_dataset(d)),
                   None)
        if hit is not None:
            out[t] = f"reads {hit}"
    return out


# ----------------------------------------------------------------------------- overfit
def overfit(search: float | None, search_se: float | None, holdout: float | None,
            holdout_se: float | None) -> OverfitResult:
    """Search score above holdout score by more than twice their combined standard error.

    Args:
        search, search_se: the finalist's score on the search items and its standard error.
        holdout, holdout_se: the same on the holdout items.
    Returns:
        ``OverfitResult(flag, gap, threshold)`` with ``gap = search - holdout`` and
        ``threshold = 2 * sqrt(search_se**2 + holdout_se**2)``; any missing/NaN input gives
        no flag and NaN threshold.
    Raises:
        ValueError: a negative standard error.
    """
    vals = [float("nan") if v is None else float(v) for v in (search, search_se, holdout, holdout_se)]
    s, s_se, h, h_se = vals
    if (s_se < 0) or (h_se < 0):
        raise ValueError(f"standard errors must be >= 0, got {s_se} and {h_se}")
    gap = s - h
    if any(math.isnan(v) for v in vals):
        return OverfitResult(False, gap, float("nan"))
    threshold = 2.0 * math.hypot(s_se, h_se)
    return OverfitResult(gap > threshold, gap, threshold)


def overfit_columns(search: float | None, search_se: float | None, holdout: float | None,
                    holdout_se: float | None) -> dict[str, Any]:
    """``{"overfit": bool, "overfit_evidence": text}`` for one finalist (see :func:`overfit`)."""
    r = overfit(search, search_se, holdout, holdout_se)
    if math.isnan(r.threshold):
        what = "no holdout score" if holdout is None or math.isnan(float(holdout)) else \
            "score or standard error missing"
        return {"overfit": False, "overfit_evidence": what}
    op = ">" if r.flag else "<="
    text = (f"search {search:.3f} ± {search_se:.3f} vs holdout {holdout:.3f} ± {holdout_se:.3f}: "
            f"gap {r.gap:+.3f} {op} 2 SE {r.threshold:.3f}")
    return {"overfit": r.flag, "overfit_evidence": text}


# ----------------------------------------------------------------------------- assessment
@dataclass(frozen=True)
class Assessment:
    """Everything the flags know about one study before any trial runs."""

    sources: tuple[Lineage, ...]
    search_tasks: tuple[str, ...]
    holdout_tasks: tuple[str, ...] = ()
    task_datasets: Mapping[str, frozenset[str]] = field(default_factory=dict)
    dataset_hits: tuple[DatasetHit, ...] = ()
    public_benchmarks: Mapping[str, str] = field(default_factory=dict)

    def merge_sources(self) -> list[Lineage]:
        """Sources whose lineage (themselves included) holds a merge."""
        return [s for s in self.sources if s.merges()]

    def source_columns(self) -> dict[str, Any]:
        """``merge_lineage``, ``eval_data_in_training`` and their evidence columns."""
        parts = []
        for s in self.sources:
            if s.merges():
                why = "; ".join(f"{n.model}: {', '.join(n.evidence)}" for n in s.merges())
                parts.append(f"{s.chain()} [{why}]")
            elif not s.available:
                parts.append(f"{s.model}: not available locally (lineage unknown)")
        grouped: dict[tuple[str, str, str], list[str]] = {}
        for h in self.dataset_hits:
            grouped.setdefault((h.source, h.via, h.card_dataset), []).append(h.task)
        data = [f"{src}{'' if via == src else ' via ' + via}: {ds} (task{'s' if len(ts) > 1 else ''} "
                f"{', '.join(dict.fromkeys(ts))})" for (src, via, ds), ts in grouped.items()]
        return {"merge_lineage": bool(self.merge_sources()),
                "merge_lineage_evidence": " | ".join(parts),
                "eval_data_in_training": bool(self.dataset_hits),
                "eval_data_in_training_evidence": " | ".join(data)}

    def study_columns(self) -> dict[str, Any]:
        """``public_benchmark_search`` and its evidence."""
        return {"public_benchmark_search": bool(self.public_benchmarks),
                "public_benchmark_search_evidence": ", ".join(
                    f"{t} ({why})" for t, why in self.public_benchmarks.items())}

    def columns(self) -> dict[str, Any]:
        """All columns known before scoring (add :func:`overfit_columns` per finalist)."""
        return {**self.source_columns(), **self.study_columns()}

    def warnings(self) -> list[str]:
        """Loud one-line warnings for the start of a search, one per raised flag."""
        cols, out = self.columns(), []
        if cols["public_benchmark_search"]:
            out.append("WARNING: public_benchmark_search: the search optimizes on public benchmark "
                       f"items ({cols['public_benchmark_search_evidence']}); scores on these "
                       "tasks will overstate the merge, and a leaderboard score of the result "
                       "is contaminated by this search. Prefer private tasks; keep benchmarks "
                       "for the holdout.")
        if cols["merge_lineage"]:
            out.append(f"WARNING: merge_lineage: {cols['merge_lineage_evidence']}")
        if cols["eval_data_in_training"]:
            out.append(f"WARNING: eval_data_in_training: {cols['eval_data_in_training_evidence']}")
        return out


def _lineage_to_dict(n: Lineage) -> dict[str, Any]:
    return {"model": n.model, "path": n.path, "is_merge": n.is_merge, "evidence": list(n.evidence),
            "parents": list(n.parents), "ancestors": [_lineage_to_dict(a) for a in n.ancestors],
            "relation": n.relation, "datasets": list(n.datasets), "notes": list(n.notes)}


def _lineage_from_dict(d: Mapping[str, Any]) -> Lineage:
    return Lineage(d["model"], d.get("path"), bool(d.get("is_merge")), tuple(d.get("evidence", ())),
                   tuple(d.get("parents", ())), tuple(_lineage_from_dict(a) for a in d.get("ancestors", ())),
                   d.get("relation", ""), tuple(d.get("datasets", ())), tuple(d.get("notes", ())))


def assessment_to_dict(a: Assessment) -> dict[str, Any]:
    """A JSON-able form of an :class:`Assessment` (stored with a study, so that export and
    report need not rebuild lm-eval's task index)."""
    return {"sources": [_lineage_to_dict(s) for s in a.sources], "search_tasks": list(a.search_tasks),
            "holdout_tasks": list(a.holdout_tasks),
            "task_datasets": {k: sorted(v) for k, v in a.task_datasets.items()},
            "dataset_hits": [list(h) for h in a.dataset_hits], "public_benchmarks": dict(a.public_benchmarks)}


def assessment_from_dict(d: Mapping[str, Any]) -> Assessment:
    """The inverse of :func:`assessment_to_dict`."""
    return Assessment(tuple(_lineage_from_dict(s) for s in d.get("sources", ())), tuple(d.get("search_tasks", ())),
                      tuple(d.get("holdout_tasks", ())), {k: frozenset(v) for k, v in d.get("task_datasets", {}).items()},
                      tuple(DatasetHit(*h) for h in d.get("dataset_hits", ())), dict(d.get("public_benchmarks", {})))


def assess(model_refs: Iterable[str], search_tasks: Iterable[str],
           holdout_tasks: Iterable[str] = (), *, include_path: Any = None,
           resolve: Resolver = default_resolve, task_manager: Any = None,
           base_dir: str | os.PathLike[str] | None = None, max_depth: int = 8) -> Assessment:
    """Compute the study-level and source flags once, before a search.

    Args:
        model_refs: every source model of the space (base model included).
        search_tasks: tasks the search optimizes on.
        holdout_tasks: tasks scored only for the holdout (checked for eval data too).
        include_path: lm-eval include path for local tasks.
        resolve, base_dir, max_depth: see :func:`model_lineage`.
        task_manager: an ``lm_eval.tasks.TaskManager`` to reuse.
    Returns:
        The :class:`Assessment`.
    """
    search, holdout = tuple(dict.fromkeys(search_tasks)), tuple(dict.fromkeys(holdout_tasks))
    ds = task_datasets([*search, *holdout], include_path, task_manager=task_manager)
    sources = tuple(model_lineage(r, resolve, base_dir=base_dir, max_depth=max_depth)
                    for r in dict.fromkeys(model_refs))
    hits = tuple(h for s in sources for h in _dataset_hits(s, ds))
    return Assessment(sources, search, holdout, {k: frozenset(v) for k, v in ds.items()}, hits,
                      public_benchmark_tasks(search, ds))


def source_flags(model_refs: Iterable[str], task_names: Iterable[str], include_path: Any = None,
                 resolve: Resolver = default_resolve) -> dict[str, Any]:
    """The source columns of ``trials.csv`` (see :meth:`Assessment.source_columns`)."""
    return assess(model_refs, (), task_names, include_path=include_path,
                  resolve=resolve).source_columns()


# ----------------------------------------------------------------------------- display
def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "yes", "1")
    if isinstance(v, float) and math.isnan(v):
        return False
    try:
        return bool(v)
    except (TypeError, ValueError):
        return False


def flag_raised(value: Any) -> bool:
    """Is a flag cell raised? Accepts bools, ``"True"``/``"yes"``/``"1"`` (a CSV read back),
    numbers; NaN, empty and anything else is not raised."""
    return _truthy(value)


def flag_marks(row: Mapping[str, Any]) -> str:
    """One letter per raised flag of a results row, e.g. ``"LO"`` (see :func:`legend`)."""
    return "".join(_MARKS[c] for c in FLAG_COLUMNS if _truthy(row.get(c)))


def legend() -> str:
    """The one-line legend ``evomerge results`` prints under the table."""
    return "flags: " + ", ".join(f"{_MARKS[c]} = {c} ({_MEANING[c]})" for c in FLAG_COLUMNS)


def render_contamination_section(assessment: Assessment, *,
                                 search: tuple[float, float] | None = None,
                                 holdout: tuple[float, float] | None = None,
                                 probe: Mapping[str, Any] | None = None, level: int = 2) -> str:
    """Markdown "Contamination and evaluation" section for a model card or an export.

    Args:
        assessment: from :func:`assess`.
        search: the exported model's ``(score, standard error)`` on the search tasks.
        holdout: the same on the holdout tasks (``None``: no holdout was scored).
        probe: ``ProbeResult.columns()`` from :mod:`evomerge.contamination.probe`, or ``None`` if not run.
        level: heading level of the section title.
    Returns:
        Markdown text ending with a newline.
    """
    cols = assessment.columns()
    if search is not None and holdout is not None:
        cols.update(overfit_columns(search[0], search[1], holdout[0], holdout[1]))
    else:
        cols.update({"overfit": False, "overfit_evidence": "not computed (no holdout score)"})
    if probe is not None:
        cols.update({k: probe.get(k) for k in ("memorization_probe", "memorization_probe_evidence")})
    h = "#" * level
    lines = [f"{h} Contamination and evaluation", "",
             "Flags measured by evomerge; a raised flag marks a risk, with its evidence.", ""]
    for c in FLAG_COLUMNS:
        if c == "memorization_probe" and probe is None:
            lines.append(f"- `{c}`: not run (opt-in: `--probe-contamination`)")
            continue
        state = "**raised**" if _truthy(cols.get(c)) else "not raised"
        ev = cols.get(f"{c}_evidence") or ""
        lines.append(f"- `{c}`: {state}" + (f": {ev}" if ev else ""))
    lines += ["", f"{h}# Parents and their lineage", ""]
    for s in assessment.sources:
        line = f"- {s.chain()}"
        if s.merges():
            line += ". Merge evidence: " + "; ".join(
                f"{n.model}: {', '.join(n.evidence)}" for n in s.merges())
        if s.datasets:
            line += ". Card datasets: " + ", ".join(s.datasets)
        notes = [n for n in s.notes if n != "not available locally"]
        lines.append(line + (". Notes: " + "; ".join(notes) if notes else ""))
    lines += ["", f"{h}# Tasks", "",
              "- Searched on: " + (", ".join(assessment.search_tasks) or "(none)"),
              "- Holdout: " + (", ".join(assessment.holdout_tasks) or "(none)")]
    if search is not None:
        lines.append(f"- Search score: {search[0]:.4f} ± {search[1]:.4f}")
    lines.append(f"- Holdout score: {holdout[0]:.4f} ± {holdout[1]:.4f}" if holdout is not None
                 else "- Holdout score: not measured")
    return "\n".join(lines) + "\n"


def as_comments(markdown: str) -> str:
    """Prefix every line with ``# `` so that a section can head an exported YAML recipe."""
    return "".join(f"# {ln}".rstrip() + "\n" for ln in markdown.splitlines())
