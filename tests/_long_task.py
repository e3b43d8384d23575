"""A long-context few-shot multiple-choice task written into a folder, and the small model shape
the scorer and pruning tests run it on."""

from __future__ import annotations

import json
import random
from pathlib import Path

__all__ = ["LONG_TASK", "SMALL", "write_long_task"]

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
LONG_TASK = "long_mc"


def write_long_task(folder: Path, n: int = 24, shots: int = 4) -> None:
    """ARC-shaped: several shots of a ~100-character passage and question, 4 choices of 2-9
    characters (so continuations of different lengths), contexts of ~400-600 tokens."""
    rng = random.Random(7)

    def doc() -> dict:
        words = [
            "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9)))
            for _ in range(16)
        ]
        i = rng.randrange(15)
        wrong = rng.sample([w for w in words if w != words[i + 1]], 3)
        label = rng.randrange(4)
        return {
            "q": f"{' '.join(words)}\nafter {words[i]}?",
            "choices": wrong[:label] + [words[i + 1]] + wrong[label:],
            "label": label,
        }

    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 12), ("test", n)):
        (folder / f"{split}.jsonl").write_text(
            "".join(json.dumps(doc()) + "\n" for _ in range(count))
        )
    (folder / f"{LONG_TASK}.yaml").write_text(
        f"task: {LONG_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {folder / 'train.jsonl'}\n"
        f"    test: {folder / 'test.jsonl'}\ntraining_split: train\ntest_split: test\nfewshot_split: train\nnum_fewshot: {shots}\n"
        'output_type: multiple_choice\ndoc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
