"""Random stream 2 (evomerge.engine.rng): each uniform a pure integer function of (seed, tensor
name, input, entry), checked against a plain-Python reference of the same formula (the argument for
equal bits on every device), for uniformity, and for equal results however a field is computed
(whole, in chunks, inside compiled kernels, on disk or resident). Stream 1 stays selectable."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.engine import Merger, digest_model_dir, merge_to_disk, open_sources
from evomerge.engine.rng import (
    STREAM,
    check_stream,
    hash_uniform,
    pragma_from_text,
    reference_uniform,
    stream_keys,
    stream_seed,
    uniform_field,
    uniform_range,
)
from evomerge.recipe.schema import load_recipe

NAME = "model.layers.3.mlp.down_proj.weight"
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")


def test_stream_2_matches_the_plain_python_formula_bit_for_bit():
    for seed, name, index in ((0, NAME, 1), (7, "lm_head.weight", 3), (2**40 + 3, "x", 0)):
        field = uniform_field(seed, name, index, torch.Size([40, 25]))
        want = torch.tensor(
            [reference_uniform(seed, name, index, j) for j in range(1000)], dtype=torch.float32
        )
        assert torch.equal(field.reshape(-1), want)
    # entries past 2**32 (a tensor that large exists only in theory here): the high word enters
    k0, k1 = stream_keys(5, NAME, 2)
    idx = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 3 * 2**32 + 17, 2**40 + 5]
    got = hash_uniform(torch.tensor(idx, dtype=torch.int64), k0, k1)
    assert got.tolist() == [reference_uniform(5, NAME, 2, j) for j in idx]
    assert len(set(got.tolist())) == len(idx)
    # (j = 2**32 and j = 0 differ only in the high word)
    assert got[0] != got[3]


def test_stream_2_is_uniform_and_its_fields_are_unrelated():
    n = 1 << 20
    u = uniform_field(3, NAME, 1, torch.Size([n])).double()
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    se = math.sqrt(1 / 12 / n)
    assert abs(float(u.mean()) - 0.5) < 5 * se
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # var of (u - 1/2)^2 is 1/180
    # Kolmogorov-Smirnov against U[0, 1): the 0.1% critical value is 1.95 / sqrt(n)
    s = torch.sort(u).values
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((grid - s).abs(), (s - (grid - 1 / n)).abs()).max())
    assert ks < 1.95 / math.sqrt(n)
    # neighbours, another input, another tensor, another seed: correlations within 5 / sqrt(n)
    c = u - 0.5
    for other in (
        c.roll(1),
        uniform_field(3, NAME, 2, torch.Size([n])).double() - 0.5,
        uniform_field(3, NAME + "x", 1, torch.Size([n])).double() - 0.5,
        uniform_field(4, NAME, 1, torch.Size([n])).double() - 0.5,
    ):
        corr = float((c * other).mean() / (c.std() * other.std()))
        assert abs(corr) < 5 / math.sqrt(n)
    # a DARE mask keeps a fraction p of the entries
    for p in (0.1, 0.5, 0.9):
        kept = float((u < p).double().mean())
        assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_chunks_of_a_field_equal_the_whole_field():
    n = 300_001
    k0, k1 = stream_keys(9, NAME, 1)
    whole = uniform_field(9, NAME, 1, torch.Size([n]))
    for size in (1, 4096, 65536, 99_999):
        parts = (
            [
                uniform_range(k0, k1, lo, min(n, lo + size), torch.device("cpu")).clone()
                for lo in range(0, n, size)
            ]
            if size > 1
            else None
        )
        if parts is not None:
            assert torch.equal(torch.cat(parts), whole), size
    # the out-of-place form that compiled kernels trace
    assert torch.equal(hash_uniform(torch.arange(n), k0, k1), whole)


def test_stream_1_is_the_old_block_generator():
    n = (1 << 20) + 10
    field = uniform_field(2, NAME, 1, torch.Size([n]), stream=1)
    g0 = torch.Generator().manual_seed(stream_seed("uniform", 2, NAME, 1, 0))
    g1 = torch.Generator().manual_seed(stream_seed("uniform", 2, NAME, 1, 1))
    assert torch.equal(field[: 1 << 20], torch.rand(1 << 20, generator=g0))
    assert torch.equal(field[1 << 20 :], torch.rand(10, generator=g1))
    assert not torch.equal(field, uniform_field(2, NAME, 1, torch.Size([n]), stream=2))


def test_the_seed_pragma_names_the_stream():
    assert STREAM == 2
    assert pragma_from_text("merge_method: dare_ties\n") == (None, 2)
    assert pragma_from_text("# evomerge-seed: 7\nmerge_method: ties\n") == (
        7,
        1,
    )  # exports before streams
    assert pragma_from_text("# x\n#  evomerge-seed: 11 stream 2 \n") == (11, 2)
    for bad in (
        "# evomerge-seed: 7 stream 9\n",
        "# evomerge-seed: 7 stream\n",
        "# evomerge-seed: seven\n",
    ):
        with pytest.raises(ValueError) as e:
            pragma_from_text(bad)
        assert "\n" not in str(e.value) and "evomerge-seed" in str(e.value)
    with pytest.raises(ValueError, match="random stream 3 is unknown"):
        check_stream(3)


def _dare_recipe(base, fts, method="dare_ties"):
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    return {
        "merge_method": method,
        "base_model": str(base),
        "dtype": "float32",
        "models": [
            {"model": str(f), "parameters": {"weight": 0.6, "density": 0.5, **extra}}
            for f in fts[:2]
        ],
    }


def test_old_exports_reproduce_with_stream_1_and_unknown_streams_are_refused(
    tiny_family, tmp_path, capsys
):
    base, fts = tiny_family
    recipe = yaml.safe_dump(_dare_recipe(base, fts), sort_keys=False)
    old = merge_to_disk(yaml.safe_load(recipe), tmp_path / "old", seed=5, stream=1)
    new = merge_to_disk(yaml.safe_load(recipe), tmp_path / "new", seed=5, stream=2)
    assert old.digest != new.digest
    for pragma, want in (
        ("# evomerge-seed: 5\n", old.digest),
        ("# evomerge-seed: 5 stream 1\n", old.digest),
        ("# evomerge-seed: 5 stream 2\n", new.digest),
    ):
        f = tmp_path / "r.yml"
        f.write_text(pragma + recipe)
        out = tmp_path / f"cli{len(list(tmp_path.iterdir()))}"
        assert main(["merge", str(f), str(out)]) == 0
        assert digest_model_dir(out) == want, pragma
    f.write_text("# evomerge-seed: 5\n" + recipe)
    assert (
        main(["merge", str(f), str(tmp_path / "flag"), "--stream", "2"]) == 0
    )  # the flag overrides the comment
    assert digest_model_dir(tmp_path / "flag") == new.digest
    capsys.readouterr()
    f.write_text("# evomerge-seed: 5 stream 3\n" + recipe)
    assert main(["merge", str(f), str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "random stream 3" in err and str(f) in err
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("method", RANDOM)
def test_resident_re_merges_equal_disk_merges(method, tiny_family, tmp_path):
    # (the compiled kernels' stream 2 masks equal the chunked kernels' in test_compiled.py)
    base, fts = tiny_family
    cfg = load_recipe(_dare_recipe(base, fts, method))
    disk = merge_to_disk(
        cfg, tmp_path / "d", seed=3
    )  # fields computed chunk by chunk from the keys
    # A CPU merger keeps stream 2 fields while they fit its cache; with no room it hashes per chunk.
    for cache_bytes, cached in ((1 << 24, method.startswith("dare")), (1, False)):
        merger = Merger(
            open_sources([str(base), *map(str, fts)]),
            seed=3,
            resident=True,
            cache_bytes=cache_bytes,
            compile=False,
        )
        plan = merger.plan(cfg)
        model = merger.build_model(plan)
        for _ in range(2):  # the second merge reads what the first cached
            assert merger.merge_into(model, plan).digest == disk.digest
        assert any(k[0] == "uniform" for k in merger.cache._items) == cached


@pytest.mark.slow  # starts a Python process (torch import: seconds)
def test_masks_are_the_same_in_a_fresh_process(tiny_family, tmp_path):
    base, fts = tiny_family
    here = merge_to_disk(_dare_recipe(base, fts), tmp_path / "a", seed=8).digest
    code = (
        "import sys, yaml; from evomerge.engine import merge_to_disk; "
        "print(merge_to_disk(yaml.safe_load(sys.argv[1]), sys.argv[2], seed=8).digest)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, yaml.safe_dump(_dare_recipe(base, fts)), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip() == here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", RANDOM)
def test_cpu_and_cuda_merges_are_bit_identical(method, tiny_family, tmp_path):
    base, fts = tiny_family
    cfg = load_recipe(_dare_recipe(base, fts, method))
    cpu = merge_to_disk(cfg, tmp_path / "cpu", seed=3, fingerprint=True)
    cuda = merge_to_disk(cfg, tmp_path / "cuda", device="cuda", seed=3, fingerprint=True)
    assert cpu.digest == cuda.digest and cpu.fingerprint == cuda.fingerprint
    merger = Merger(open_sources([str(base), *map(str, fts)]), device="cuda", seed=3, resident=True)
    plan = merger.plan(cfg)
    got = merger.merge_into(merger.build_model(plan), plan)
    assert got.digest == cpu.fingerprint  # a CUDA merger records fingerprints


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["slerp", "ties", "linear", "task_arithmetic"])
def test_cpu_and_cuda_deterministic_methods_are_bit_identical(method, tiny_family, tmp_path):
    # slerp's angle is reduced in float64 (exact products), so its coefficients agree across devices
    base, fts = tiny_family
    models = [
        {"model": str(f), "parameters": {"weight": w}}
        for f, w in zip(fts, (0.5, 0.3, 0.2), strict=False)
    ]
    r = {
        "slerp": {
            "merge_method": "slerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(fts[0])}],
            "parameters": {"t": [0.1, 0.5, 0.9]},
        },
        "ties": {
            "merge_method": "ties",
            "base_model": str(base),
            "models": models,
            "parameters": {"density": 0.5},
        },
        "linear": {"merge_method": "linear", "models": models},
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": models,
        },
    }[method]
    cfg = load_recipe({**r, "dtype": "float32"})
    assert (
        merge_to_disk(cfg, tmp_path / "cpu").digest
        == merge_to_disk(cfg, tmp_path / "cuda", device="cuda").digest
    )
