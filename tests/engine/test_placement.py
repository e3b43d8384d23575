"""Placement of resident sources (evomerge.engine.placement) by byte accounting: four 7B-class
bf16 sources, the merged model and room for evaluation fit an 80 GB card by construction; a smaller
budget streams them from pinned host memory. Sources are held in their stored dtype."""

from __future__ import annotations

import pytest
import torch

from evomerge.cli import main
from evomerge.engine import Merger, merge_to_disk, open_sources, placement
from evomerge.engine import merger as merger_mod
from evomerge.engine.placement import EVAL_MIN, SCRATCH, budget_override, choose_placement
from evomerge.errors import EvomergeError
from evomerge.recipe.schema import load_recipe

GiB = 1 << 30


def mistral_7b_shapes() -> dict[str, tuple[int, ...]]:
    """Mistral-7B-v0.1's tensors: hidden 4096, MLP 14336, 32 layers, 8 KV heads of 128, vocab 32000."""
    h, inter, kv, vocab = 4096, 14336, 1024, 32000
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab, h),
        "lm_head.weight": (vocab, h),
        "model.norm.weight": (h,),
    }
    for i in range(32):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes


class _Stub:
    """A source that only knows its tensors' shapes and dtype (no weights: 7B of them would not fit a test)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], itemsize: int = 2) -> None:
        self.shapes, self.itemsize = shapes, itemsize

    def names(self):
        return iter(self.shapes)

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self.shapes[name]:
            n *= s
        return n * self.itemsize


def test_four_7b_sources_fit_an_80gb_card_by_construction():
    params = sum(_Stub(mistral_7b_shapes(), 1).nbytes(n) for n in mistral_7b_shapes())
    assert params == 7_241_732_096  # Mistral-7B's published count
    one = 2 * params  # bf16
    # 4 x 13.49 GiB sources + 13.49 GiB model + 4 GiB eval room (a quarter of the model is 3.37 GiB) + 1 GiB scratch
    p = choose_placement(4 * one, one, 79 * GiB)
    assert (p.model, p.eval_room, p.scratch) == (one, EVAL_MIN, SCRATCH)
    assert p.needed == 5 * one + 5 * GiB
    assert round(p.needed / GiB, 2) == 72.44 and p.where == "device"
    line = p.describe()
    assert (
        "sources 53.96 + model 13.49 + eval room 4.00 + scratch 1.00 = 72.44 GiB <= 79.00 GiB free"
        in line
    )
    # held in float32, as before, the sources alone would take 107.9 GiB: streamed from the host
    assert choose_placement(8 * one, 2 * one, 79 * GiB).where == "host"
    # a 60 GB budget (decimal, like --out-shard-size) leaves 55.88 GiB: streamed
    q = choose_placement(4 * one, one, budget_override("60GB"), overridden=True)
    assert (
        q.where == "host"
        and "> 55.88 GiB --gpu-memory" in q.describe()
        and "pinned host memory" in q.describe()
    )
    assert choose_placement(4 * one, one, 1 << 40, device_type="cpu").where == "cpu"


def test_a_cuda_merger_places_by_free_memory_or_the_override(monkeypatch):
    # The decision as a CUDA merger makes it, without a GPU: the device check and the free memory are stubbed.
    monkeypatch.setattr(merger_mod, "check_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(placement, "free_memory", lambda d: 79 * GiB)
    sources = {f"m{i}": _Stub(mistral_7b_shapes()) for i in range(4)}
    m = Merger(sources, device="cuda", resident=True, compile=False)  # type: ignore[arg-type]
    assert (
        m.placement is not None
        and m.placement.where == "device"
        and m.placement.sources == 4 * 2 * 7_241_732_096
    )
    assert (
        m.cache is not None and m.cache.max_bytes == 79 * GiB - m.placement.needed
    )  # the cache gets what is spare
    assert m.digest_kind == "fingerprint"
    assert (
        Merger(sources, device="cuda", resident=True, gpu_memory="60GB").placement.where == "host"
    )  # type: ignore[arg-type]
    monkeypatch.setenv("EVOMERGE_GPU_MEMORY", "70GB")
    assert Merger(sources, device="cuda", resident=True).placement.available == 70 * 10**9  # type: ignore[arg-type,union-attr]
    assert Merger(sources, device="cuda", resident=True, hold="compute").placement.where == "host"  # type: ignore[arg-type,union-attr]
    assert Merger(sources, device="cuda").placement is None  # type: ignore[arg-type]  # disk merges stream anyway


def test_bad_gpu_memory_is_one_line(tmp_path, capsys):
    with pytest.raises(EvomergeError, match="--gpu-memory: cannot read 'lots'"):
        budget_override("lots")
    assert main(["search", str(tmp_path / "missing.yml"), "--gpu-memory", "60 gigs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpu-memory" in err


def test_sources_are_held_in_their_stored_dtype(tmp_path):
    from _tiny import make_tiny, perturbed

    base = make_tiny(tmp_path / "b", dtype=torch.bfloat16)
    ft = [perturbed(base, tmp_path / f"f{i}", seed=i) for i in range(2)]
    cfg = load_recipe(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "models": [
                {"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in ft
            ],
        }
    )
    want = merge_to_disk(cfg, tmp_path / "d").digest
    for hold, dtype in (("stored", torch.bfloat16), ("compute", torch.float32)):
        m = Merger(
            open_sources([str(base), *map(str, ft)]), resident=True, hold=hold, compile=False
        )
        plan = m.plan(cfg)
        assert m.merge_into(m.build_model(plan), plan).digest == want
        assert {t.dtype for t in m.tensors.held.values()} == {dtype}
        assert m.placement is not None and m.placement.where == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sources_stream_from_pinned_memory_under_a_cap(tmp_path):
    from _tiny import make_tiny, perturbed

    base = make_tiny(
        tmp_path / "b",
        dtype=torch.bfloat16,
        hidden_size=256,
        intermediate_size=1024,
        vocab_size=4096,
    )
    ft = [perturbed(base, tmp_path / f"f{i}", seed=i) for i in range(3)]
    cfg = load_recipe(
        {
            "merge_method": "dare_ties",
            "base_model": str(base),
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "models": [
                {"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in ft
            ],
        }
    )
    want = merge_to_disk(cfg, tmp_path / "d", fingerprint=True).fingerprint
    free, total = torch.cuda.mem_get_info()
    torch.cuda.set_per_process_memory_fraction(
        min(1.0, (torch.cuda.memory_reserved() + (6 << 30)) / total)
    )
    try:
        peaks = {}
        for budget in (None, "1M"):  # free memory (capped at ~6 GiB), then a budget nothing fits
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            m = Merger(
                open_sources([str(base), *map(str, ft)]),
                device="cuda",
                resident=True,
                gpu_memory=budget,
            )
            plan = m.plan(cfg)
            assert m.merge_into(m.build_model(plan), plan).digest == want
            assert m.placement is not None
            peaks[m.placement.where] = torch.cuda.max_memory_allocated()
            del m
        assert set(peaks) == {"device", "host"} and peaks["host"] < peaks["device"]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
