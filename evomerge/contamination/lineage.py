"""Merge lineage of a source model: is it (or an ancestor) a merge, and what did its cards declare?

Evidence is read from the model directory only: card front-matter ``tags`` (:data:`MERGE_TAGS`),
``base_model_relation: merge``, a ``base_model:`` list of two or more parents, a
``mergekit_config.yml``, or card text that says so ("is a merge of", "merged using mergekit").
Parents are followed recursively where they exist on this machine (never the network),
cycle-safe and depth-limited; :meth:`Lineage.chain` shows the ancestor chain. References are
resolved by :func:`evomerge.engine.sources.resolve_model` with downloads off, after trying a
relative path against the directory of the card that names it.

Example::

    lin = model_lineage("out/merged")
    lin.chain()   # 'out/merged <- merge of (org/a, org/b [not available locally])'
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from evomerge.engine.sources import resolve_model
from evomerge.errors import ConfigError

__all__ = [
    "MERGE_TAGS",
    "Card",
    "Lineage",
    "Resolver",
    "read_card",
    "default_resolve",
    "model_lineage",
]

MERGE_TAGS = ("merge", "mergekit", "lazymergekit", "moerge", "frankenmerge", "evomerge")
_MERGE_TEXT = [
    re.compile(p, re.I)
    for p in (
        r"\b(?:is|was) an? (?:[\w\-/]+ ){0,3}merge of\b",
        r"\bwas merged (?:using|with|via)\b",
        r"\bmerged (?:\w+ ){0,3}(?:using|with|via) \[?mergekit\b",
    )
]
_MERGEKIT_FILES = ("mergekit_config.yml", "mergekit_moe_config.yml")

Resolver = Callable[[str, "Path | None"], "Path | None"]
"""``resolve(ref, base_dir) -> directory or None``; must not touch the network."""


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
        shown = [
            n for n in self.notes if n in ("not available locally", "cycle", "depth limit reached")
        ]
        head = self.model + (f" [{'; '.join(shown)}]" if shown else "")
        if not self.ancestors:
            return head
        label = "merge" if self.is_merge else (self.relation or "fine-tune")
        return f"{head} <- {label} of ({', '.join(a.chain() for a in self.ancestors)})"


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
    body = text[m.end() :]
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
            return add(ref.get("model", ref.get("path")))
        if isinstance(ref, str) and ref.strip():
            ref = ref.strip()
            # mergekit's "model+lora" names the model the adapter is applied to
            out.append(ref if Path(ref).expanduser().exists() else ref.split("+", 1)[0])

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
    return {
        "is_merge": bool(evidence),
        "evidence": tuple(evidence),
        "parents": tuple(unique),
        "relation": relation,
        "datasets": tuple(_strings(meta.get("datasets"))),
        "notes": tuple(notes),
    }


# ----------------------------------------------------------------------------- lineage
def default_resolve(
    ref: str,
    base_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path | None:
    """Find a model reference on this machine, never on the network.

    A relative path is tried first against ``base_dir`` (the directory of the model whose card
    names it) and its parent directory; everything else goes to
    :func:`~evomerge.engine.sources.resolve_model` with ``allow_download=False`` (a directory
    with ``config.json``, a hub id in the local Hugging Face cache, or a scheme reference such
    as ``zoo:micro/base``).

    Args:
        ref: the reference as written in a recipe or card.
        base_dir: directory to resolve relative paths against first.
        cache_dir: Hugging Face hub cache to look hub ids up in (default: the user's cache).
    Returns:
        The model directory, or ``None`` when it is not available locally.
    """
    ref = ref.strip()
    p = Path(ref).expanduser()
    roots = (
        [Path(base_dir), Path(base_dir).parent]
        if base_dir is not None and not p.is_absolute()
        else []
    )
    for cand in [*(str(r / p) for r in roots if (r / p).is_dir()), ref]:
        try:
            with _hub_cache(cache_dir):
                return resolve_model(cand, allow_download=False)
        except ConfigError:  # not here, not cached, not a model: all mean "unknown"
            continue
    return None


@contextmanager
def _hub_cache(cache_dir: str | os.PathLike[str] | None) -> Iterator[None]:
    # resolve_model takes no cache directory, and huggingface_hub reads its default from a module
    # constant at call time: point that constant elsewhere for the duration of one lookup.
    if cache_dir is None:
        yield
        return
    from huggingface_hub import constants

    saved, constants.HF_HUB_CACHE = constants.HF_HUB_CACHE, str(cache_dir)
    try:
        yield
    finally:
        constants.HF_HUB_CACHE = saved


def model_lineage(
    ref: str,
    resolve: Resolver = default_resolve,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    max_depth: int = 8,
    max_nodes: int = 256,
) -> Lineage:
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
            return Lineage(
                ref,
                str(path),
                info["is_merge"],
                info["evidence"],
                tuple(parents),
                (),
                info["relation"],
                info["datasets"],
                notes + ("depth limit reached",),
            )
        ancestors = tuple(visit(p, path, depth - 1, seen | {key}) for p in parents)
        return Lineage(
            ref,
            str(path),
            info["is_merge"],
            info["evidence"],
            tuple(parents),
            ancestors,
            info["relation"],
            info["datasets"],
            notes,
        )

    return visit(ref, Path(base_dir) if base_dir is not None else None, max_depth, frozenset())
