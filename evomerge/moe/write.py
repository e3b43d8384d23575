"""``evomerge moe``: a mixture of experts to a model directory that appears atomically, or in memory.

The directory holds what ``evomerge merge`` writes for a merge: safetensors shards, ``config.json``,
the base's ``generation_config.json`` and tokenizer files, the configuration as
``mergekit_moe_config.yml`` (the name mergekit-moe uses) and a model card. Every check that needs
no tensor (the configuration, the output directory, the models and their architectures) comes
before anything is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.dtypes import torch_dtype
from evomerge.engine.card import TOKENIZER_FILES, copy_model_files
from evomerge.engine.merger import check_device
from evomerge.engine.sources import open_sources
from evomerge.engine.writer import AtomicDir, ShardedWriter, parse_size
from evomerge.errors import EvomergeError, one_line
from evomerge.moe.build import MoEBuilder, MoEResult
from evomerge.moe.card import render_moe_card
from evomerge.moe.config import MoEConfig, load_moe_config

__all__ = ["moe_to_disk", "moe_in_memory", "CONFIG_NAME"]

CONFIG_NAME = "mergekit_moe_config.yml"


def _fields(cfg: MoEConfig) -> dict[str, str]:
    fields = {cfg.base_model: "base_model"}
    for i, e in enumerate(cfg.experts):
        fields.setdefault(e.source_model, f"experts[{i}].source_model")
    return fields


def moe_to_disk(
    config: MoEConfig | Mapping[str, Any] | str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    shard_size: str | int = "5GB",
    copy_tokenizer: bool = True,
    force: bool = False,
    config_text: str | None = None,
    card_extra: str = "",
) -> MoEResult:
    """Build a mixture of experts into a Hugging Face model directory, atomically.

    Args:
        config: a mergekit-moe configuration file, mapping or :class:`MoEConfig`.
        out_dir: the output directory (absent or empty unless ``force``).
        device: where the base model runs to route by prompts (``gate_mode: hidden``).
        seed: seeds random routers (``random``, ``uniform_random``) and ``noise_scale``.
        shard_size: maximum shard size (``"2GB"``, ``"500M"`` or bytes).
        copy_tokenizer: copy the base model's tokenizer files.
        force: replace a non-empty ``out_dir``.
        config_text: the text saved as ``mergekit_moe_config.yml`` (default: the configuration as YAML).
        card_extra: markdown appended to the model card.

    Returns:
        A :class:`~evomerge.moe.build.MoEResult` (tensor digest, time, sizes).

    Raises:
        ConfigError / EvomergeError: a bad configuration, a missing or incompatible model, an
            unusable output directory; nothing is written then.
    """
    cfg = config if isinstance(config, MoEConfig) else load_moe_config(config)
    max_shard = parse_size(shard_size)
    check_device(device)
    atomic = AtomicDir(
        out_dir, force=force
    )  # refuses a non-empty or unwritable target, creates nothing
    sources = open_sources(cfg.referenced_models(), file=cfg.source_file, fields=_fields(cfg))
    builder = MoEBuilder(sources, device=device, seed=seed)
    builder.check(cfg)
    layout = builder.layout(cfg)
    out_dtype = torch_dtype(layout.dtype)
    try:
        with atomic:  # removes its temp dir on any error below
            writer = ShardedWriter(
                atomic.path, [(n, s, out_dtype) for n, s in layout.specs], max_shard
            )
            try:
                result = builder.run(cfg, layout, writer.write)
                writer.close()
            finally:
                writer.abort()
            layout.config.save_pretrained(
                str(atomic.path)
            )  # config.json, as transformers writes it
            copy_model_files(
                sources[cfg.base_model].path,
                atomic.path,
                ("generation_config.json",) + (TOKENIZER_FILES if copy_tokenizer else ()),
            )
            text = config_text if config_text is not None else cfg.to_yaml()
            (atomic.path / CONFIG_NAME).write_text(text)
            (atomic.path / "README.md").write_text(
                render_moe_card(cfg, text, dtype=layout.dtype, extra=card_extra)
            )
    except OSError as e:  # disk full, a permission changed mid-build...
        raise EvomergeError(
            f"output {out_dir}: cannot write the mixture of experts: {one_line(e.strerror or e)}"
        ) from None
    return result


def moe_in_memory(
    config: MoEConfig | Mapping[str, Any] | str | Path, *, device: str = "cpu", seed: int = 0
) -> torch.nn.Module:
    """Build a mixture of experts into a new in-memory ``MixtralForCausalLM`` (no disk writes).

    Args:
        config: a configuration file, mapping or :class:`MoEConfig`.
        device: where the model lives (and the base runs for ``gate_mode: hidden``).
        seed: seeds random routers and noise.

    Returns:
        The model, in eval mode, with ``model.evomerge_digest`` set to its digest (:class:`~evomerge.moe.build.MoEResult`).
    """
    cfg = config if isinstance(config, MoEConfig) else load_moe_config(config)
    builder = MoEBuilder(
        open_sources(cfg.referenced_models(), file=cfg.source_file, fields=_fields(cfg)),
        device=device,
        seed=seed,
    )
    builder.check(cfg)
    layout = builder.layout(cfg)
    model = builder.build_model(layout)
    model.evomerge_digest = builder.build_into(model, cfg, layout).digest  # type: ignore[assignment]
    return model
