"""The zoo's data: a character tokenizer, skill items and the lm-eval task files.

Every skill maps a short letter string to another one (``"rot: dkfab =" -> " kfabd"``: rotate
left by one; ``sort``: sort the letters; ``shift``: each letter to the next in the alphabet). The
multiple-choice items offer four answers built so that a model without the skill sits at chance:
for ``rot`` and ``sort`` all choices are permutations of the same letters, for ``shift`` all are
Caesar shifts of the input. The base model is pretrained on the same prompts with *random* answers
of the right family (any permutation, any shift) plus a ``copy`` task, so it knows every format and
how to copy letters, but none of the skills; each expert then learns one skill as a small delta.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHARS",
    "SKILLS",
    "Item",
    "make_tokenizer",
    "make_item",
    "skill_answer",
    "skill_prompt",
    "make_items",
    "pretrain_text",
    "skill_text",
    "write_tasks",
    "eval_strings",
    "task_names",
]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Everything a prompt or answer can contain; special tokens come first in the vocabulary.
CHARS = LETTERS + "0123456789 :=>+-\n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
SKILLS: tuple[str, ...] = ("rot", "sort", "shift")
STRING_LEN = 5
N_CHOICES = 4


@dataclass(frozen=True)
class Item:
    """One multiple-choice item: the prompt, the choices and the index of the right one."""

    skill: str
    prompt: str
    choices: tuple[str, ...]
    label: int

    @property
    def answer(self) -> str:
        return self.choices[self.label]

    def to_json(self) -> dict[str, object]:
        return {"prompt": self.prompt, "choices": list(self.choices), "label": self.label}


def make_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A character-level tokenizer (one token per character, no special tokens added on encode).

    Returns:
        A ``PreTrainedTokenizerFast`` that ``save_pretrained`` writes and ``AutoTokenizer`` reloads.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every single character is its own pre-token; spaces and newlines included.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=32,
        clean_up_tokenization_spaces=False,
    )


def _solve(skill: str, s: str, k: int = 1) -> str:
    if skill == "rot":
        return s[1:] + s[:1]
    if skill == "rev":
        return s[::-1]
    if skill == "sort":
        return "".join(sorted(s))
    if skill in ("shift", "shiftk"):
        return "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in s)
    if skill == "copy":
        return s
    raise ValueError(skill)


def _prompt(skill: str, s: str) -> str:
    return f"{skill}: {s} ="


def skill_answer(skill: str, s: str) -> str:
    """The right answer of ``skill`` for the letter string ``s`` (``skill_answer("rot", "abc") == "bca"``)."""
    return _solve(skill, s)


def skill_prompt(skill: str, s: str) -> str:
    """The prompt of ``skill`` for the letter string ``s`` (``"rot: abc ="``)."""
    return _prompt(skill, s)


def make_item(skill: str, rng: random.Random) -> Item:
    """A random multiple-choice item of ``skill`` with distractors from the same answer family.

    Args:
        skill: one of :data:`SKILLS`.
        rng: the random source (items are a pure function of its state).

    Returns:
        The :class:`Item`.
    """
    while True:
        s = "".join(rng.sample(LETTERS, STRING_LEN))
        gold = _solve(skill, s)
        if gold != s:
            break
    if skill == "shift":
        # Other shift amounts: a model that only knows "answers are shifts" cannot tell them apart.
        ks = rng.sample([k for k in range(2, 26)], N_CHOICES - 1)
        wrong = [_solve("shift", s, k) for k in ks]
    else:
        # Other permutations; never the identity, the rotation, the reversal or the sorted string,
        # so that a model with a neighbouring skill (or a copier) gains nothing here.
        banned = {s, s[::-1], s[1:] + s[:1], "".join(sorted(s)), gold}
        wrong = []
        while len(wrong) < N_CHOICES - 1:
            p = "".join(rng.sample(s, len(s)))
            if p not in banned and p not in wrong:
                wrong.append(p)
    label = rng.randrange(N_CHOICES)
    choices = wrong[:label] + [gold] + wrong[label:]
    return Item(skill, _prompt(skill, s), tuple(choices), label)


def make_items(skill: str, n: int, seed: int, exclude: set[str] | None = None) -> list[Item]:
    """``n`` distinct items of a skill (distinct prompts), none of whose prompts is in ``exclude``."""
    rng = random.Random(f"items/{skill}/{seed}")
    seen = set(exclude or ())
    out: list[Item] = []
    while len(out) < n:
        it = make_item(skill, rng)
        if it.prompt not in seen:
            seen.add(it.prompt)
            out.append(it)
    return out


def skill_text(
    skill: str, rng: random.Random, *, correct: bool = True, avoid: frozenset[str] = frozenset()
) -> str:
    """One training line ``prompt + " " + answer + "\\n"``; ``correct=False`` draws a random answer
    of the skill's family (a random permutation, a random shift), used to pretrain the base.
    Letter strings in ``avoid`` (those of the evaluation items) are never trained on."""
    s = "".join(rng.sample(LETTERS, STRING_LEN))
    while s in avoid:
        s = "".join(rng.sample(LETTERS, STRING_LEN))
    if correct:
        ans = _solve(skill, s)
    elif skill == "shift":
        ans = _solve("shift", s, rng.randrange(1, 26))
    else:
        ans = "".join(rng.sample(s, len(s)))
    return f"{_prompt(skill, s)} {ans}\n"


def pretrain_text(rng: random.Random, avoid: frozenset[str] = frozenset()) -> str:
    """One line of the base's pretraining mixture: every skill's format with random answers, and
    ``copy`` with correct answers (it teaches attention to the input letters)."""
    skill = rng.choice(("copy",) + SKILLS)
    return skill_text(skill, rng, correct=skill == "copy", avoid=avoid)


def eval_strings(n: int, seed: int, skills: Sequence[str] = SKILLS) -> frozenset[str]:
    """The letter strings of every evaluation item (search and holdout, all skills): kept out of
    training so that no zoo task item was ever seen by a zoo model."""
    return frozenset(
        it.prompt.split(": ", 1)[1][:STRING_LEN]
        for skill in skills
        for it in make_items(skill, n, seed)
    )


def task_names(skills: Sequence[str] = SKILLS) -> tuple[list[str], list[str]]:
    """(search task names, holdout task names) of the zoo: ``zoo_<skill>`` and ``zoo_<skill>_holdout``."""
    return [f"zoo_{s}" for s in skills], [f"zoo_{s}_holdout" for s in skills]


_YAML = """\
# Generated by evomerge zoo; items are regenerated from the seed in zoo.json.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(
    tasks_dir: Path,
    final_tasks_dir: Path,
    n_search: int,
    n_holdout: int,
    seed: int,
    skills: Sequence[str] = SKILLS,
) -> dict[str, int]:
    """Write ``zoo_<skill>.jsonl`` / ``zoo_<skill>_holdout.jsonl`` and their lm-eval YAMLs.

    The holdout items are drawn after the search items with their prompts excluded, so the two
    sets share no item.

    Args:
        tasks_dir: where to write now (a temp dir during a build).
        final_tasks_dir: where the files will live; YAMLs name their JSONL by this absolute path.
        n_search: items per search task.
        n_holdout: items per holdout task.
        seed: item seed.

    Returns:
        task name -> number of items.
    """
    tasks_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for skill in skills:
        items = make_items(skill, n_search + n_holdout, seed)
        for name, part in (
            (f"zoo_{skill}", items[:n_search]),
            (f"zoo_{skill}_holdout", items[n_search:]),
        ):
            with open(tasks_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for it in part:
                    f.write(json.dumps(it.to_json()) + "\n")
            counts[name] = len(part)
    rewrite_task_yamls(tasks_dir, final_tasks_dir)
    return counts


def rewrite_task_yamls(tasks_dir: Path, final_tasks_dir: Path) -> None:
    """(Re)write one YAML per JSONL in ``tasks_dir``, pointing at ``final_tasks_dir`` (absolute)."""
    final = Path(final_tasks_dir).resolve()
    for data in sorted(Path(tasks_dir).glob("*.jsonl")):
        name = data.stem
        text = _YAML.format(name=name, data=json.dumps(str(final / data.name)))
        (Path(tasks_dir) / f"{name}.yaml").write_text(text, encoding="utf-8")
