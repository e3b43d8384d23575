"""The search's device-side fingerprint of merged tensors (evomerge.engine.hashes): its row sums
against plain-Python integers, the CPU path against the GPU path's formulation, sensitivity to any
changed bit, and its use: a merger recording fingerprints, checked against the saved model."""

from __future__ import annotations

import struct

import pytest
import torch

from evomerge.engine import Merger, digest_model_dir, hashes, merge_to_disk, open_sources
from evomerge.engine.hashes import ROW, Fingerprint, is_fingerprint, row_sums
from evomerge.engine.rng import _mix_py
from evomerge.recipe.schema import load_recipe


def _weights(j: int) -> tuple[int, int]:
    out = []
    for k0, k1 in hashes._KEYS:
        h = _mix_py(_mix_py((j & 0xFFFFFFFF) ^ k0) ^ ((k1 + (j >> 32)) & 0xFFFFFFFF))
        out.append((h >> 1) | 1)
    return out[0], out[1]


def test_row_sums_are_the_weighted_sums_of_16_bit_words():
    t = torch.randn(ROW + 1000).to(torch.bfloat16)
    words = struct.unpack(f"<{t.numel()}h", t.view(torch.uint8).numpy().tobytes())  # signed 16-bit
    w = [_weights(j) for j in range(ROW)]
    want = []
    for r0 in range(0, len(words), ROW):
        row = words[r0 : r0 + ROW]
        want.append(
            [
                sum(x * w[j][0] for j, x in enumerate(row)),
                sum(x * w[j][1] for j, x in enumerate(row)),
            ]
        )
    assert row_sums(t).tolist() == want
    # float32: two words per entry (little-endian halves); int8: one byte each
    f = torch.tensor([1.5, -2.0])
    lo_hi = struct.unpack("<4h", f.numpy().tobytes())
    assert row_sums(f).tolist() == [
        [sum(x * _weights(j)[k] for j, x in enumerate(lo_hi)) for k in (0, 1)]
    ]
    b = torch.tensor([3, 250], dtype=torch.uint8)
    assert row_sums(b).tolist() == [[3 * _weights(0)[k] + 250 * _weights(1)[k] for k in (0, 1)]]


def test_cpu_rows_equal_the_gpu_formulation():
    # The CUDA path (whole-slab int64 ops) run on the CPU gives the CPU path's sums.
    for n in (5, ROW, 3 * ROW + 17):
        t = torch.randn(n)
        w = hashes._words(t)
        table = hashes._table(w.device)
        assert torch.equal(hashes._row_sums_slabs(w, table), row_sums(t)), n


def test_any_changed_bit_name_shape_or_dtype_changes_the_fingerprint():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3 * ROW + 5, generator=g).to(torch.bfloat16)

    def fp(items):
        f = Fingerprint()
        for name, x in items:
            f.add(name, x)
        return f.hexdigest()

    ref = fp([("a", t)])
    assert is_fingerprint(ref) and len(ref) == 36 and not is_fingerprint("ab" * 32)
    bits = t.view(torch.int16)
    for pos in (0, ROW - 1, ROW, 2 * ROW + 77, t.numel() - 1):
        for bit in (0, 7, 15):
            flipped = bits.clone()
            flipped[pos] ^= (1 << bit) if bit < 15 else -32768  # int16: bit 15 is the sign
            assert fp([("a", flipped.view(torch.bfloat16))]) != ref, (pos, bit)
    assert fp([("b", t)]) != ref
    assert fp([("a", t.clone())]) == ref  # same bytes, shape and dtype
    assert fp([("a", t[:-1].reshape(2, -1))]) != fp([("a", t[:-1])])
    assert fp([("a", t.view(torch.float16))]) != ref
    # swapping two tensors' contents, or two rows of one tensor
    u = torch.randn(ROW, generator=g).to(torch.bfloat16)
    assert fp([("a", t[:ROW]), ("b", u)]) != fp([("a", u), ("b", t[:ROW])])
    swapped = torch.cat([t[ROW : 2 * ROW], t[:ROW], t[2 * ROW :]])
    assert fp([("a", swapped)]) != ref


def test_a_fingerprint_merger_matches_the_saved_model(tiny_family, tmp_path):
    base, fts = tiny_family
    cfg = load_recipe(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "models": [
                {"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in fts
            ],
        }
    )
    disk = merge_to_disk(cfg, tmp_path / "m", fingerprint=True)
    assert is_fingerprint(disk.fingerprint) and not is_fingerprint(disk.digest)
    assert disk.fingerprint == digest_model_dir(tmp_path / "m", kind="fingerprint")
    assert disk.digest == digest_model_dir(tmp_path / "m")
    merger = Merger(
        open_sources([str(base), *map(str, fts)]),
        resident=True,
        digest="fingerprint",
        compile=False,
    )
    assert (
        Merger(open_sources([str(base)]), digest="auto").digest_kind == "sha256"
    )  # CPU: sha256 is faster there
    plan = merger.plan(cfg)
    got = merger.merge_into(merger.build_model(plan), plan)
    assert got.digest == disk.fingerprint
    with pytest.raises(ValueError, match="digest must be"):
        Merger({}, digest="md5")


@pytest.mark.slow
def test_export_checks_a_fingerprinted_trial_and_names_the_stream(
    tiny_family, tmp_path, monkeypatch
):
    # A CUDA search records fingerprints; here a CPU merger is told to, as it would be there.
    import functools

    from _fake_eval import TaskVectorEvaluator
    from _spaces import dare_space

    from evomerge.cli import main
    from evomerge.search import setup
    from evomerge.search.loop import run_search
    from evomerge.search.table import load_trials

    monkeypatch.setattr(setup, "Merger", functools.partial(Merger, digest="fingerprint"))
    base, fts = tiny_family
    space = dare_space(tmp_path / "s.yml", base, fts, trials=2)
    out = run_search(
        space,
        evaluator=TaskVectorEvaluator(base, fts),
        results_dir=tmp_path / "r",
        quiet=True,
        log=lambda m: None,
    )
    df = load_trials(out.paths.csv)
    number = int(df.loc[df["baseline"] == "", "number"].iloc[0])
    digest = df.loc[df["number"] == number, "digest"].iloc[0]
    assert is_fingerprint(digest)
    best = tmp_path / "best.yml"
    assert (
        main(
            [
                "export",
                str(space),
                "--results-dir",
                str(tmp_path / "r"),
                "--trial",
                str(number),
                "-o",
                str(best),
                "--merge",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert "# evomerge-seed: 3 stream 2" in best.read_text()
    assert digest_model_dir(tmp_path / "m", kind="fingerprint") == digest
    # A study made before streams were named records none: its exports say stream 1.
    from evomerge.search.storage import load_study, locate

    study = load_study(locate(str(space), results_dir=str(tmp_path / "r")))
    assert study.user_attrs["stream"] == 2
    study.set_user_attr("stream", None)
    old = tmp_path / "old.yml"
    assert (
        main(
            [
                "export",
                str(space),
                "--results-dir",
                str(tmp_path / "r"),
                "--trial",
                str(number),
                "-o",
                str(old),
            ]
        )
        == 0
    )
    assert "# evomerge-seed: 3 stream 1" in old.read_text()
