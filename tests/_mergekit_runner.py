"""Run by mergekit's own Python (``.venv-mk/bin/python``), never imported by the tests themselves.

``python _mergekit_runner.py jobs.json results.json`` merges each job's recipe with mergekit's
``run_merge`` (one process for every job: mergekit's start-up is paid once, not per recipe) and
applies the checks of mergekit's ``tests/common.py::run_and_check_merge`` to every directory a job
names (mergekit's output and evomerge's): a model file and ``config.json`` exist, no tensor holds a
NaN, and every non-optional tensor of the architecture mergekit assigns (``arch_info_for_config``
of the output's config, or ``get_architecture_info`` of the recipe for ``auto_arch`` jobs) is there.

A required tensor missing under its exact name is listed in ``strict_missing``; it counts as
present (not in ``missing``) when the directory holds checkpoint keys that mergekit's own
``can_convert_checkpoint_keys`` turns into it, the test mergekit applies to the source models
when it decides which tensors they have. transformers 5 saves LLaVA under the checkpoint names
(``vision_tower.*``) while its modules are named ``model.vision_tower.*``: without that allowance
the check would reject transformers' own ``save_pretrained`` output.

jobs.json: a list of ``{"id", "config", "out", "check": [dirs], "auto_arch": bool}``; ``out`` null
checks only. results.json: per id, ``error`` (mergekit's exception in one line, or null) and per
checked directory ``{"ok", "problems", "missing", "strict_missing"}``, and ``modules_yaml``: the recipe
as mergekit rewrote it while planning (``MergeConfiguration.to_yaml()``, the ``modules:`` form).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml


def _check(path: str, config, auto_arch: bool) -> dict:
    from mergekit.architecture import arch_info_for_config, get_architecture_info
    from mergekit.architecture.conversion import can_convert_checkpoint_keys
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader
    from mergekit.merge import MergeOptions
    from transformers import AutoConfig

    problems: list[str] = []
    d = Path(path)
    if not ((d / "model.safetensors.index.json").exists() or (d / "model.safetensors").exists()):
        return {"ok": False, "problems": ["no model produced"], "missing": [], "strict_missing": []}
    if not (d / "config.json").exists():
        problems.append("no config.json")
    loader = LazyTensorLoader.from_disk(path, lazy_unpickle=False)
    names = set(loader.index.tensor_paths)
    for name in sorted(names):
        if loader.get_tensor(name).view(-1).isnan().any():
            problems.append(f"NaN in {name}")
    model_config = AutoConfig.from_pretrained(path)
    arch = (
        get_architecture_info(config, MergeOptions())
        if auto_arch
        else arch_info_for_config(model_config)
    )
    missing, strict = [], []
    if arch is None:
        problems.append(f"mergekit knows no architecture for {model_config.architectures}")
    else:
        for w in arch.all_weights(model_config):
            if w.optional or w.name in names or any(a in names for a in (w.aliases or ())):
                continue
            strict.append(w.name)
            if not can_convert_checkpoint_keys(model_config.model_type, names, w.name):
                missing.append(w.name)
    if missing:
        problems.append(f"missing {len(missing)} tensors, first {missing[0]}")
    return {"ok": not problems, "problems": problems, "missing": missing, "strict_missing": strict}


def main(jobs_file: str, results_file: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    results: dict[str, dict] = {}
    for job in json.loads(Path(jobs_file).read_text()):
        config = MergeConfiguration.model_validate(yaml.safe_load(Path(job["config"]).read_text()))
        res: dict = {"error": None, "checks": {}}
        if job.get("out"):
            try:
                run_merge(
                    config,
                    out_path=job["out"],
                    options=MergeOptions(
                        random_seed=0, copy_tokenizer=False, write_model_card=False, quiet=True
                    ),
                )
                # run_merge rewrites the recipe as the modules it planned: the modules: form to_yaml() writes.
                res["modules_yaml"] = config.to_yaml()
            except Exception as e:  # recorded: the test decides whether a refusal was expected
                res["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        for path in job.get("check", []):
            if Path(path).is_dir():
                res["checks"][path] = _check(path, config, bool(job.get("auto_arch")))
        results[job["id"]] = res
    Path(results_file).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
