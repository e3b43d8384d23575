"""Tiny models for tests: a transformers config, random weights, saved as a real model dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LLAMA = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=64,
)


def make_tiny(
    path: Path,
    seed: int = 0,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """Save a randomly initialised tiny causal LM of the given architecture to ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(LLAMA)
    if arch == "gpt2":
        kwargs = dict(n_embd=16, n_layer=4, n_head=4, vocab_size=64, n_positions=64)
    elif arch in ("gemma", "gemma2"):
        kwargs.update(head_dim=4)
    elif arch == "phi3":
        kwargs.pop("num_key_value_heads")
    elif arch == "mixtral":
        kwargs.update(num_local_experts=2, num_experts_per_tok=1)
    kwargs.update(overrides)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random norms too, so that merges of norm weights are not trivially all ones.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return path


def perturbed(base: Path, path: Path, seed: int, scale: float = 0.05) -> Path:
    """A 'fine-tune' of ``base``: the same model plus seeded noise on every tensor."""
    import shutil

    path.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, path / f.name)
    g = torch.Generator().manual_seed(seed)
    for f in base.glob("*.safetensors"):
        sd = load_file(f)
        out = {
            k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
            for k, v in sd.items()
        }
        save_file(out, path / f.name, metadata={"format": "pt"})
    return path


def llava_config(vision_layers: int = 3, text_layers: int = 2) -> Any:
    """A tiny LLaVA config: a CLIP vision tower and a Llama language model, 16 wide."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=16,
        patch_size=4,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        hidden_size=16,
        intermediate_size=32,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=text_layers,
    )
    return LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
