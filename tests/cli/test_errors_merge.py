"""`evomerge merge` on bad input: damaged model files, bad output paths and flags, bad recipes,
and weights that cancel out. Each is one line on stderr naming the file (or flag), exit code 2,
and nothing written; zero-sum weights do what the README says."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.cli import main


def write(tmp: Path, recipe: Any, name: str = "recipe.yml") -> Path:
    p = tmp / name
    p.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return p


def lin(models: list[Path], weights: list[float] | None = None, **top: Any) -> dict[str, Any]:
    weights = weights if weights is not None else [1.0] * len(models)
    r: dict[str, Any] = {
        "merge_method": "linear",
        "models": [
            {"model": str(m), "parameters": {"weight": w}}
            for m, w in zip(models, weights, strict=True)
        ],
    }
    r.update(top)
    return r


def refuse(
    tmp: Path,
    recipe: Any,
    capsys: pytest.CaptureFixture[str],
    *must: str,
    extra: list[str] | None = None,
    out: Path | None = None,
    recipe_path: Path | None = None,
) -> str:
    """Run the CLI; check exit 2, one line without a traceback that holds every ``must``, and no output."""
    path = recipe_path if recipe_path is not None else write(tmp, recipe)
    out = out if out is not None else tmp / "out"
    before = sorted(p.name for p in tmp.iterdir())
    capsys.readouterr()  # drop what building the models printed
    code = main(["merge", str(path), str(out), *(extra or [])])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("evomerge: error: "), lines[0]
    for m in must:
        assert m in lines[0], (m, lines[0])
    assert not out.exists() or out.is_file()
    assert sorted(p.name for p in tmp.iterdir()) == before  # no temp dir, no parent dirs, nothing
    return lines[0]


# --- damaged model directories -------------------------------------------------------------


def _header(f: Path) -> tuple[int, dict[str, Any], bytes]:
    b = f.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return n, json.loads(b[8 : 8 + n]), b[8 + n :]


def _pack(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def truncated(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f


def truncated_in_header(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return f


def few_bytes(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00")
    return f


def empty(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_bytes(b"")
    return f


def html_page(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    return f


def lfs_pointer(d: Path) -> Path:
    f = d / "model.safetensors"
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 45632\n")
    return f


def offsets_past_end(d: Path) -> Path:
    # A header that lies: the last tensor's data reaches 4 KB past the end of the file.
    f = d / "model.safetensors"
    _, header, data = _header(f)
    last = max(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
    )
    header[last]["data_offsets"][1] += 4096
    f.write_bytes(_pack(header, data))
    return f


def inconsistent_offsets(d: Path) -> Path:
    # Within the file, but the tensor's bytes do not match its shape (the library's own check).
    f = d / "model.safetensors"
    _, header, data = _header(f)
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
    f.write_bytes(_pack(header, data))
    return f


def header_not_json(d: Path) -> Path:
    f = d / "model.safetensors"
    n, _, data = _header(f)
    f.write_bytes(struct.pack("<Q", n) + b"\xff" * n + data)
    return f


def shard_is_a_directory(d: Path) -> Path:
    f = d / "model.safetensors"
    f.unlink()
    f.mkdir()
    return f


def _shard(d: Path) -> dict[str, str]:
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file(
        {k: sd[k] for k in first}, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"}
    )
    save_file(
        {k: sd[k] for k in second},
        d / "model-00002-of-00002.safetensors",
        metadata={"format": "pt"},
    )
    return {k: "model-00001-of-00002.safetensors" for k in first} | {
        k: "model-00002-of-00002.safetensors" for k in second
    }


def missing_shard(d: Path) -> Path:
    weight_map = _shard(d)
    (d / "model-00002-of-00002.safetensors").unlink()
    f = d / "model.safetensors.index.json"
    f.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return f


def index_not_json(d: Path) -> Path:
    _shard(d)
    f = d / "model.safetensors.index.json"
    f.write_text('{"weight_map": {"model.embed_tokens.weight": ')
    return f


def index_a_list(d: Path) -> Path:
    _shard(d)
    f = d / "model.safetensors.index.json"
    f.write_text("[]")
    return f


def index_without_weight_map(d: Path) -> Path:
    _shard(d)
    f = d / "model.safetensors.index.json"
    f.write_text('{"metadata": {"total_size": 1}}')
    return f


def config_not_json(d: Path) -> Path:
    f = d / "config.json"
    f.write_text("model_type: llama\n")
    return f


def config_a_list(d: Path) -> Path:
    f = d / "config.json"
    f.write_text('["llama"]')
    return f


def config_not_utf8(d: Path) -> Path:
    f = d / "config.json"
    f.write_bytes(b"\xff\xfe{\x00}\x00")
    return f


BREAKS: dict[Callable[[Path], Path], str] = {
    truncated: "is truncated",
    truncated_in_header: "is truncated",
    few_bytes: "truncated, or not a safetensors file",
    empty: "is empty",
    html_page: "is not a safetensors file",
    lfs_pointer: "Git LFS pointer",
    offsets_past_end: "is truncated",
    inconsistent_offsets: "is not a valid safetensors file",
    header_not_json: "header is not a JSON object",
    shard_is_a_directory: "is not a file",
    missing_shard: "model-00002-of-00002.safetensors, which does not exist",
    index_not_json: "is not valid JSON",
    index_a_list: "must be a JSON object, got a JSON list",
    index_without_weight_map: "weight_map",
    config_not_json: "is not valid JSON",
    config_a_list: "must be a JSON object, got a JSON list",
    config_not_utf8: "is not UTF-8",
}


@pytest.mark.parametrize("damage", list(BREAKS), ids=lambda f: f.__name__)
def test_damaged_model(damage, tiny_family, tmp_path, capsys):
    base, models = tiny_family
    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    bad_file = damage(broken)
    # The output's parents do not exist yet: a refused merge must not create them either.
    line = refuse(
        tmp_path,
        lin([base, broken]),
        capsys,
        str(bad_file),
        BREAKS[damage],
        out=tmp_path / "new" / "out",
    )
    assert line.count(str(bad_file)) == 1


def test_damaged_bin_checkpoint(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    refuse(
        tmp_path,
        lin([base, broken]),
        capsys,
        str(broken / "pytorch_model.bin"),
        "not a readable PyTorch checkpoint",
        extra=["--allow-bin"],
    )


def test_damage_is_found_when_opening(tiny_family, tmp_path):
    """A truncated file fails when the model is opened (before any trial of a search), not at first read."""
    from evomerge.engine.sources import ModelSource
    from evomerge.errors import EvomergeError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_family[1][0], broken)
    offsets_past_end(broken)
    with pytest.raises(EvomergeError, match="is truncated"):
        ModelSource("broken", broken)


# --- output directory ------------------------------------------------------------------------


def test_output_is_a_file(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    (tmp_path / "taken").write_text("x")
    refuse(tmp_path, lin(models[:2]), capsys, "taken", "not a directory", out=tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "x"
    refuse(
        tmp_path,
        lin(models[:2]),
        capsys,
        str(tmp_path / "taken"),
        "is a file, not a directory",
        out=tmp_path / "taken" / "sub" / "out",
    )


def test_output_not_writable(tiny_family, tmp_path, capsys, monkeypatch):
    base, models = tiny_family
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root may write anywhere: pretend the permission is missing
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode, **kw: False if Path(p) == locked else real(p, mode, **kw)
        )
    else:
        locked.chmod(0o500)
    try:
        refuse(tmp_path, lin(models[:2]), capsys, "no permission", str(locked), out=locked / "out")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_write_fails_midway(tiny_family, tmp_path, capsys, monkeypatch):
    """A disk that fills up during the merge: one line, and the temp directory is removed."""
    from evomerge.engine.writer import ShardedWriter

    base, models = tiny_family
    calls = {"n": 0}
    real = ShardedWriter.write

    def write_then_fail(self: ShardedWriter, name: str, tensor: torch.Tensor) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "write", write_then_fail)
    refuse(tmp_path, lin(models[:2]), capsys, "out", "No space left on device")


# --- flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,message",
    [
        ("abc", "cannot read 'abc'"),
        ("0", "must be a positive size"),
        ("-5", "must be a positive size"),
        ("5B", "ambiguous"),
        ("1e400G", "cannot read"),
        ("", "cannot read"),
    ],
)
def test_bad_shard_size(size, message, tiny_family, tmp_path, capsys):
    base, models = tiny_family
    refuse(
        tmp_path,
        lin(models[:2]),
        capsys,
        "--out-shard-size",
        message,
        extra=["--out-shard-size", size],
    )


@pytest.mark.parametrize(
    "device,message",
    [
        ("tpu", "not a device"),
        ("", "not a device"),
        ("cuda:x", "not a device"),
        ("meta", "cpu or cuda"),
        ("mps", "cpu or cuda"),
        ("cuda:99", "cuda"),
    ],
)
def test_bad_device(device, message, tiny_family, tmp_path, capsys):
    base, models = tiny_family
    refuse(tmp_path, lin(models[:2]), capsys, "--device", message, extra=["--device", device])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    refuse(
        tmp_path,
        lin(models[:2]),
        capsys,
        "--device cuda",
        "no CUDA device",
        extra=["--device", "cuda"],
    )


# --- recipe files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("- linear\n- ties\n", "must be a mapping"),
        ("42\n", "must be a mapping"),
        ("linear\n", "must be a mapping"),
        ("", "empty recipe"),
        ("# only a comment\n", "empty recipe"),
    ],
)
def test_recipe_not_a_mapping(text, message, tmp_path, capsys):
    path = write(tmp_path, text)
    refuse(tmp_path, None, capsys, str(path), message, recipe_path=path)


def test_recipe_unreadable(tmp_path, capsys):
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"\xff\xfe\x00merge_method")
    refuse(tmp_path, None, capsys, str(binary), "not UTF-8", recipe_path=binary)
    refuse(
        tmp_path,
        None,
        capsys,
        str(tmp_path / "missing.yml"),
        "cannot read recipe",
        recipe_path=tmp_path / "missing.yml",
    )
    (tmp_path / "adir.yml").mkdir()
    refuse(
        tmp_path,
        None,
        capsys,
        str(tmp_path / "adir.yml"),
        "cannot read recipe",
        recipe_path=tmp_path / "adir.yml",
    )


# --- weights that cancel out -----------------------------------------------------------------


@pytest.mark.parametrize(
    "method,weights,shown",
    [
        ("linear", [1.0, -1.0], "(1, -1) sum to 0"),
        ("linear", [0.0, 0.0], "(0, 0) sum to 0"),
        ("linear", [0.1, 0.2, -0.3], "(0.1, 0.2, -0.3) sum to 5.55112e-17"),
        ("multislerp", [1.0, -1.0], "(1, -1) sum to 0"),
    ],
)
def test_zero_weight_sum_is_refused(method, weights, shown, tiny_family, tmp_path, capsys):
    base, models = tiny_family
    path = write(tmp_path, lin(models[: len(weights)], weights, merge_method=method))
    line = refuse(
        tmp_path,
        None,
        capsys,
        str(path),
        "tensor model.",
        f"{method}: the weights {shown}",
        "normalize",
        recipe_path=path,
    )
    assert "set normalize" in line


def _merge(
    tmp: Path, recipe: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> dict[str, torch.Tensor]:
    out = tmp / "merged"
    code = main(["merge", str(write(tmp, recipe)), str(out)])
    assert code == 0, capsys.readouterr().err
    return load_file(out / "model.safetensors")


def test_zero_weight_sum_without_normalize_is_the_plain_sum(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    merged = _merge(tmp_path, lin(models[:2], [1.0, -1.0], parameters={"normalize": False}), capsys)
    a, b = load_file(models[0] / "model.safetensors"), load_file(models[1] / "model.safetensors")
    for name, t in merged.items():
        assert torch.equal(t, a[name] - b[name]), name


def test_tiny_weights_that_do_not_cancel_still_normalize(tiny_family, tmp_path, capsys):
    base, models = tiny_family
    merged = _merge(tmp_path, lin(models[:2], [1e-9, 1e-9]), capsys)
    a, b = load_file(models[0] / "model.safetensors"), load_file(models[1] / "model.safetensors")
    for name, t in merged.items():
        torch.testing.assert_close(t, (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-7)


def test_task_arithmetic_zero_sum_divides_by_one(tiny_family, tmp_path, capsys):
    """mergekit's rule for the task-vector family: a weight sum of 0 divides by 1."""
    base, models = tiny_family
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "parameters": {"normalize": True},
        "models": [
            {"model": str(m), "parameters": {"weight": w}}
            for m, w in zip(models[:2], [1.0, -1.0], strict=True)
        ],
    }
    merged = _merge(tmp_path, recipe, capsys)
    x0, a, b = (load_file(p / "model.safetensors") for p in (base, models[0], models[1]))
    for name, t in merged.items():
        torch.testing.assert_close(
            t, x0[name] + (a[name] - x0[name]) - (b[name] - x0[name]), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize(
    "method,params",
    [
        ("ties", {"density": 0.5}),
        ("dare_linear", {"density": 0.5}),
        ("della", {"density": 0.5, "epsilon": 0.1}),
        ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
        ("nuslerp", {}),
    ],
)
def test_cancelling_weights_of_other_methods_merge(method, params, tiny_family, tmp_path, capsys):
    """The other methods that divide by a weight sum follow mergekit's guards: finite output."""
    base, models = tiny_family
    recipe: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": w, **params}}
            for m, w in zip(models[:2], [1.0, -1.0], strict=True)
        ],
    }
    if method != "nuslerp":
        recipe["parameters"] = {"normalize": True}
    merged = _merge(tmp_path, recipe, capsys)
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
