"""Scheme references (``zoo:demo/base``, or any registered prefix) resolve through one registry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from evomerge.engine import digest_model_dir, merge_to_disk
from evomerge.errors import ConfigError
from evomerge.schemes import Scheme, register, resolve, scheme_of


def test_a_registered_scheme_names_models_in_recipes(tmp_path, tiny_family):
    base, fts = tiny_family
    dirs = {"base": base, "ft0": fts[0], "ft1": fts[1]}
    register(Scheme("mem", lambda rest: dirs.get(rest), lambda: [f"mem:{k}" for k in dirs]))
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "mem:base",
        "dtype": "float32",
        "models": [
            {"model": "mem:ft0", "parameters": {"weight": 0.5}},
            {"model": "mem:ft1", "parameters": {"weight": 0.5}},
        ],
    }
    by_path = {
        **recipe,
        "base_model": str(base),
        "models": [{"model": str(f), "parameters": {"weight": 0.5}} for f in fts[:2]],
    }
    merge_to_disk(recipe, tmp_path / "a")
    merge_to_disk(by_path, tmp_path / "b")
    assert digest_model_dir(tmp_path / "a") == digest_model_dir(tmp_path / "b")
    with pytest.raises(
        ConfigError, match=r"unknown model 'mem:ft9' \(did you mean mem:ft1, mem:ft0"
    ):
        merge_to_disk({**recipe, "base_model": "mem:ft9"}, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_paths_and_hub_ids_are_not_scheme_references():
    for ref in ("/models/x", "org/name", "org/name@main", "C:/models/x", "https://host/x", "./x"):
        assert scheme_of(ref) is None and resolve(ref) is None


@pytest.mark.slow
def test_the_zoo_registers_through_its_entry_point_without_being_imported():
    code = (
        "import sys; from evomerge.schemes import scheme_of; import evomerge.engine; "
        "assert 'evomerge.zoo' not in sys.modules; s = scheme_of('zoo:micro/base'); print(s.name, 'evomerge.zoo' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["zoo", "True"]
