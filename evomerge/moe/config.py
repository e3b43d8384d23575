"""The mixture-of-experts configuration: mergekit-moe's schema, validated strictly at load.

A configuration is exactly what ``mergekit-moe`` reads::

    base_model: mistralai/Mistral-7B-v0.1
    gate_mode: hidden            # hidden | cheap_embed | random | uniform_random
    experts_per_token: 2
    dtype: bfloat16
    experts:
      - source_model: WizardLM/WizardMath-7B-V1.1
        positive_prompts: ["math", "solve"]
        negative_prompts: ["chat"]      # optional
        noise_scale: 0.01               # optional: gaussian noise added to the expert's MLP
        residual_scale: 0.5             # optional: scales the expert's down projection

The seed documents' form, ``merge_method: moe`` beside ``experts:``, is read as the same thing.
Like merge recipes, unknown keys are refused with a did-you-mean instead of being ignored, and every
check that needs no model (prompts, ``experts_per_token``, names) is made here, before any model
is opened. The output is a Mixtral model: ``shared_experts`` (which need another output
architecture) and ``architecture`` values other than Mixtral are refused in one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evomerge.dtypes import ALIASES, canonical
from evomerge.errors import ConfigError, did_you_mean
from evomerge.io import dump_yaml, read_yaml

__all__ = [
    "GATE_MODES",
    "PROMPTED_MODES",
    "EXPERT_KEYS",
    "Expert",
    "MoEConfig",
    "load_moe_config",
    "parse_moe_config",
    "is_moe_mapping",
]

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
# Gate modes whose router weights come from each expert's prompts.
PROMPTED_MODES = ("hidden", "cheap_embed")
_TOP_KEYS = (
    "base_model",
    "experts",
    "gate_mode",
    "experts_per_token",
    "dtype",
    "shared_experts",
    "architecture",
    "merge_method",
)
EXPERT_KEYS = (
    "source_model",
    "positive_prompts",
    "negative_prompts",
    "noise_scale",
    "residual_scale",
)
_ARCHITECTURES = ("mixtral", "deepseek", "qwen", "qwen3")


@dataclass(frozen=True)
class Expert:
    """One expert: a model whose MLP becomes one expert of every layer, and its routing prompts."""

    source_model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoEConfig:
    """A validated mixture-of-experts configuration; ``raw`` keeps the mapping it came from."""

    base_model: str
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    dtype: str | None = None
    source_file: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def referenced_models(self) -> list[str]:
        """The base, then every expert's model, each once."""
        return list(dict.fromkeys([self.base_model, *(e.source_model for e in self.experts)]))

    def to_yaml(self) -> str:
        """The configuration as mergekit-moe YAML (without evomerge's ``merge_method: moe``)."""
        return dump_yaml({k: v for k, v in self.raw.items() if k != "merge_method"})


def is_moe_mapping(data: Any) -> bool:
    """Whether a parsed YAML mapping is a mixture-of-experts configuration (it has ``experts:``,
    ``gate_mode:`` or ``merge_method: moe``) rather than a merge recipe."""
    return isinstance(data, Mapping) and (
        "experts" in data or "gate_mode" in data or data.get("merge_method") == "moe"
    )


def load_moe_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> MoEConfig:
    """Load and validate a mergekit-moe configuration from a YAML file or a mapping.

    Args:
        source: path to a YAML file, or the already-parsed mapping.

    Returns:
        The validated :class:`MoEConfig`.

    Raises:
        ConfigError: naming the file, the field and what is allowed.

    Example:
        >>> cfg = load_moe_config({"base_model": "b", "gate_mode": "random", "experts_per_token": 1,
        ...     "experts": [{"source_model": "x"}, {"source_model": "y"}]})
        >>> cfg.gate_mode, [e.source_model for e in cfg.experts]
        ('random', ['x', 'y'])
    """
    if isinstance(source, Mapping):
        return parse_moe_config(source, None)
    return parse_moe_config(read_yaml(source), str(source))


def _model_ref(value: Any, file: str | None, fld: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(file, fld, f"must be a model path or hub id string, got {value!r}")
    return value.strip()


def _mapping(
    value: Any, file: str | None, fld: str | None, allowed: tuple[str, ...]
) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            file,
            fld,
            f"must be a mapping with keys {', '.join(allowed)}, got {type(value).__name__}",
        )
    for key in value:
        if key not in allowed:
            raise ConfigError(
                file,
                f"{fld}.{key}" if fld else str(key),
                f"unknown key{did_you_mean(str(key), allowed)}",
            )
    return value


def _prompts(value: Any, file: str | None, fld: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(file, fld, "must be a list of prompt strings")
    return tuple(value)


def _number(value: Any, file: str | None, fld: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(file, fld, f"must be a finite number, got {value!r}")
    return float(value)


def _expert(entry: Any, file: str | None, fld: str) -> Expert:
    e = _mapping(entry, file, fld, EXPERT_KEYS)
    if "source_model" not in e:
        raise ConfigError(file, fld, "needs a source_model")
    return Expert(
        _model_ref(e["source_model"], file, f"{fld}.source_model"),
        _prompts(e.get("positive_prompts"), file, f"{fld}.positive_prompts"),
        _prompts(e.get("negative_prompts"), file, f"{fld}.negative_prompts"),
        _number(e.get("noise_scale"), file, f"{fld}.noise_scale"),
        _number(e.get("residual_scale"), file, f"{fld}.residual_scale"),
    )


def parse_moe_config(data: Any, file: str | None = None) -> MoEConfig:
    """Validate a parsed mixture-of-experts mapping (see :func:`load_moe_config`).

    Raises:
        ConfigError: the first problem, with the file and the field.
    """
    if data is None:
        raise ConfigError(file, None, "empty configuration: expected base_model and experts")
    m = _mapping(data, file, None, _TOP_KEYS)
    if m.get("merge_method", "moe") != "moe":
        raise ConfigError(
            file,
            "merge_method",
            f"a mixture-of-experts configuration takes merge_method: moe or none, got {m['merge_method']!r}",
        )
    if m.get("base_model") is None:
        raise ConfigError(
            file,
            "base_model",
            "missing: the model whose attention, embeddings and norms the mixture keeps",
        )
    base = _model_ref(m["base_model"], file, "base_model")
    if m.get("shared_experts"):
        raise ConfigError(
            file,
            "shared_experts",
            "is not supported: evomerge builds Mixtral models, which have no shared experts (mergekit-moe builds them as Qwen2-MoE or DeepSeek models)",
        )
    arch = m.get("architecture")
    if arch is not None:
        if not isinstance(arch, str) or not arch.strip():
            raise ConfigError(
                file, "architecture", f"must be a string such as mixtral, got {arch!r}"
            )
        if not "mixtral".startswith(arch.strip().lower()):
            known = [a for a in _ARCHITECTURES if a.startswith(arch.strip().lower())]
            if not known:
                raise ConfigError(
                    file,
                    "architecture",
                    f"unknown output architecture {arch!r}{did_you_mean(arch.lower(), _ARCHITECTURES)}",
                )
            raise ConfigError(
                file,
                "architecture",
                f"{arch!r} output is not supported: evomerge builds Mixtral models from Llama or Mistral experts (use mergekit-moe for {known[0]})",
            )
    mode = m.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise ConfigError(
            file, "gate_mode", f"unknown gate_mode {mode!r}{did_you_mean(str(mode), GATE_MODES)}"
        )
    raw_experts = m.get("experts")
    if not isinstance(raw_experts, list) or not raw_experts:
        raise ConfigError(
            file, "experts", "must be a non-empty list of {source_model, positive_prompts}"
        )
    experts = tuple(_expert(e, file, f"experts[{i}]") for i, e in enumerate(raw_experts))
    k = m.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(file, "experts_per_token", f"must be a whole number >= 1, got {k!r}")
    if k > len(experts):
        given = "is" if "experts_per_token" in m else "is not given and defaults to"
        listed = f"only {len(experts)} expert{'s are' if len(experts) > 1 else ' is'} listed"
        raise ConfigError(
            file,
            "experts_per_token",
            f"{given} {k} but {listed}; it must be at most the number of experts",
        )
    dtype = m.get("dtype")
    if dtype is not None and canonical(str(dtype)) is None:
        raise ConfigError(
            file, "dtype", f"unknown dtype {dtype!r}{did_you_mean(str(dtype), ALIASES)}"
        )
    _check_routing(experts, mode, file)
    return MoEConfig(
        base,
        experts,
        str(mode),
        k,
        canonical(str(dtype)) if dtype is not None else None,
        file,
        dict(m),
    )


def _check_routing(experts: tuple[Expert, ...], mode: str, file: str | None) -> None:
    """Refuse configurations whose routing cannot tell the experts apart."""
    if len(experts) > 1 and all(e.source_model == experts[0].source_model for e in experts[1:]):
        raise ConfigError(
            file,
            "experts",
            f"every expert is {experts[0].source_model!r}: the mixture would compute the same MLP at greater cost; list different models",
        )
    if mode not in PROMPTED_MODES:
        return
    for i, e in enumerate(experts):
        if not e.positive_prompts:
            raise ConfigError(
                file,
                f"experts[{i}].positive_prompts",
                f"missing: gate_mode {mode} routes tokens by each expert's prompts (or use gate_mode: random)",
            )
        if not any(p.strip() for p in e.positive_prompts):
            raise ConfigError(file, f"experts[{i}].positive_prompts", "has only empty prompts")
    first = (experts[0].positive_prompts, experts[0].negative_prompts)
    if len(experts) > 1 and all(
        (e.positive_prompts, e.negative_prompts) == first for e in experts[1:]
    ):
        raise ConfigError(
            file,
            "experts",
            f"every expert has the same prompts, so gate_mode {mode} would route every token to the same experts; give each expert prompts for what it should handle",
        )
