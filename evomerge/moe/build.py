"""Building a Mixtral mixture of experts from a base model and dense experts, tensor by tensor.

The output is a ``MixtralForCausalLM`` in transformers' own layout: attention, embeddings, norms and
``lm_head`` from the base; at layer ``i``, expert ``j``'s ``gate_proj`` and ``up_proj`` stacked as
``mlp.experts.gate_up_proj[j]`` (gate rows first) and its ``down_proj`` as ``mlp.experts.down_proj[j]``;
the router ``mlp.gate.weight`` from :mod:`evomerge.moe.router`. That is the layout mergekit-moe
0.1.5 writes, so both tools' outputs compare tensor by tensor.

Every expert must be a Llama or Mistral model of the base's architecture and shapes; each check
is one line naming the field. ``noise_scale`` adds seeded gaussian noise to an expert's three MLP
matrices and ``residual_scale`` scales its down projection, drawn in mergekit-moe's order (routers
first, then layer by layer, expert by expert: gate, down, up).

An expert's MLP tensors come from a callable ``name -> tensor``: a model's checkpoint, or the
merged tensors of a merge recipe held in memory (a "MoE from merges" candidate in a search).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.compat import model_from_config, no_init_weights
from evomerge.dtypes import canonical, torch_dtype
from evomerge.engine.hashes import tensor_digest, tensors_digest
from evomerge.engine.merger import check_device
from evomerge.engine.sources import ModelSource
from evomerge.errors import ConfigError, EvomergeError
from evomerge.moe.config import MoEConfig
from evomerge.moe.router import Router

__all__ = ["FAMILIES", "MoEBuilder", "MoELayout", "MoEResult", "ExpertTensors"]

# Model types whose MLP (gate_proj, up_proj, down_proj) maps onto Mixtral's experts.
FAMILIES = ("llama", "mistral")
# The order mergekit-moe draws an expert's noise in, and the Mixtral tensor each projection feeds.
_PROJ_ORDER = ("gate_proj", "down_proj", "up_proj")
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")

ExpertTensors = Callable[[str], torch.Tensor]


@dataclass
class MoELayout:
    """The output model: its transformers config, and every tensor's name and shape in write order."""

    config: Any
    specs: list[tuple[str, tuple[int, ...]]]
    dtype: str

    def config_dict(self) -> dict[str, Any]:
        """``config.json`` as transformers writes it."""
        return dict(self.config.to_diff_dict())


@dataclass
class MoEResult:
    """What a build did: its digests and the time it took.

    ``tensor_digest`` hashes the tensors alone (as :func:`~evomerge.engine.merger.digest_model_dir`
    of the written directory); ``digest`` adds ``experts_per_token``, which changes the model
    without changing a tensor, so that a search never takes one mixture's scores for another's.
    """

    digest: str
    seconds: float
    n_tensors: int
    bytes_out: int
    tensor_digest: str = ""
    per_tensor: dict[str, str] = field(default_factory=dict, repr=False)


def _layer(name: str) -> int:
    return int(name.split(".")[2])


def _check_expert(file: str | None, fld: str, src: ModelSource, base: ModelSource) -> None:
    """Refuse an expert of another family or shape than the base, or without Llama MLP tensors."""
    btype = base.config.get("model_type")
    if src.config.get("model_type") != btype:
        raise ConfigError(
            file,
            fld,
            f"is a {src.config.get('model_type')!r} model but the base is {btype!r}: every expert must have the base's architecture",
        )
    for key in _SHAPE_KEYS:
        if src.config.get(key) != base.config.get(key):
            raise ConfigError(
                file,
                fld,
                f"has {key} {src.config.get(key)} but the base has {base.config.get(key)}: every expert must have the base's shapes",
            )
    for layer in range(int(base.config["num_hidden_layers"])):
        for proj in _PROJ_ORDER:
            name = f"model.layers.{layer}.mlp.{proj}.weight"
            if name not in src:
                raise ConfigError(file, fld, f"has no tensor {name}: not a Llama/Mistral MLP")


def _check_output(where: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse an output tensor of the wrong shape (an expert of other shapes) or not finite."""
    if tuple(t.shape) != shape:
        raise EvomergeError(
            f"{where}: tensor {name} is {list(t.shape)} but the Mixtral model needs {list(shape)} (an expert of other shapes?)"
        )
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise EvomergeError(f"{where}: tensor {name} has NaN or inf values")


def _mixtral_config(base: ModelSource, cfg: MoEConfig, dtype: str) -> Any:
    """The ``MixtralConfig`` of a mixture over ``base`` (read as a Mistral model, no sliding window)."""
    from transformers import AutoConfig, MistralConfig, MixtralConfig

    base_cfg = AutoConfig.from_pretrained(str(base.path))
    if not isinstance(base_cfg, MistralConfig):
        as_mistral = MistralConfig(**base_cfg.to_dict())
        as_mistral.sliding_window = None
        base_cfg = as_mistral
    out = MixtralConfig(**base_cfg.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = len(cfg.experts)
    out.num_experts_per_tok = cfg.experts_per_token
    out.sliding_window = None
    out.dtype = dtype
    return out


class MoEBuilder:
    """Builds mixtures over opened models (base and experts).

    Args:
        sources: the opened models by reference; must hold every model a configuration names.
        device: where the base runs for ``gate_mode: hidden`` and where resident models live.
        seed: seeds random routers and noise.
    """

    def __init__(
        self, sources: dict[str, ModelSource], *, device: str | torch.device = "cpu", seed: int = 0
    ) -> None:
        self.sources = sources
        self.device = check_device(device)
        self.seed = seed
        self._routers: dict[str, Router] = {}

    def router(self, base: str) -> Router:
        """The router computer of a base model (kept: it caches the prompts' hidden states)."""
        if base not in self._routers:
            self._routers[base] = Router(self.sources[base], self.device)
        return self._routers[base]

    def check(self, cfg: MoEConfig, experts: Sequence[ModelSource | None] | None = None) -> None:
        """Refuse a configuration whose models cannot form a Mixtral model, in one line.

        Args:
            cfg: the configuration.
            experts: the opened source of each expert, or None for an expert given as merged tensors
                (checked for shape when built); default: ``cfg``'s models from ``self.sources``.

        Raises:
            ConfigError: a base or an expert of another family or shape, or missing MLP tensors.
        """
        file = cfg.source_file
        base = self.sources[cfg.base_model]
        btype = base.config.get("model_type")
        if btype not in FAMILIES:
            raise ConfigError(
                file,
                "base_model",
                f"is a {btype!r} model; evomerge builds Mixtral mixtures from Llama or Mistral models only (mergekit-moe builds other families as Qwen2-MoE or DeepSeek models)",
            )
        srcs = (
            experts if experts is not None else [self.sources[e.source_model] for e in cfg.experts]
        )
        for i, src in enumerate(srcs):
            if src is not None:
                _check_expert(file, f"experts[{i}].source_model", src, base)

    def layout(self, cfg: MoEConfig) -> MoELayout:
        """The output's config and tensor list (no tensor is read).

        Raises:
            ConfigError: a base tensor has no place in a Mixtral model (biases, say), or a Mixtral
                tensor has no source in the base.
        """
        base = self.sources[cfg.base_model]
        dtype = (
            cfg.dtype
            or canonical(
                str(base.config.get("dtype") or base.config.get("torch_dtype") or "float32")
            )
            or "float32"
        )
        out = _mixtral_config(base, cfg, dtype)
        with torch.device("meta"):
            from transformers import MixtralForCausalLM

            meta = MixtralForCausalLM(out)
        wanted = {n: tuple(t.shape) for n, t in meta.state_dict().items()}
        tied = bool(getattr(out, "tie_word_embeddings", False))
        specs: list[tuple[str, tuple[int, ...]]] = []
        moe_parts: list[tuple[str, tuple[int, ...]]] = []
        routers: list[tuple[str, tuple[int, ...]]] = []
        for name, shape in wanted.items():
            if ".mlp.gate." in name:
                routers.append((name, shape))
            elif ".mlp.experts." in name:
                moe_parts.append((name, shape))
            elif name in base:
                if base.shape(name) != shape:
                    raise ConfigError(
                        cfg.source_file,
                        "base_model",
                        f"tensor {name} is {list(base.shape(name))} but a Mixtral model of its config needs {list(shape)}",
                    )
                specs.append((name, shape))
            elif not (tied and name == "lm_head.weight"):
                raise ConfigError(
                    cfg.source_file,
                    "base_model",
                    f"has no tensor {name}, which the Mixtral model needs",
                )
        left = [n for n in base.names() if n not in wanted and ".mlp." not in n]
        if left:
            raise ConfigError(
                cfg.source_file,
                "base_model",
                f"tensor {left[0]} has no place in a Mixtral model (Mixtral has no attention or MLP biases)",
            )
        moe_parts.sort(key=lambda s: (_layer(s[0]), "down_proj" in s[0]))
        return MoELayout(
            out, specs + moe_parts + sorted(routers, key=lambda s: _layer(s[0])), dtype
        )

    def tensors(
        self, cfg: MoEConfig, layout: MoELayout, experts: Sequence[ExpertTensors] | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every output tensor, in ``layout.specs`` order, in the output dtype (on the CPU).

        Args:
            cfg: the configuration.
            layout: its layout (:meth:`layout`).
            experts: each expert's MLP tensors by name; default: read from the experts' models.
        """
        out_dtype = torch_dtype(layout.dtype)
        gen = torch.Generator().manual_seed(self.seed)
        gates = self.router(cfg.base_model).gates(cfg.gate_mode, cfg.experts, gen)
        base = self.sources[cfg.base_model]
        get = (
            list(experts)
            if experts is not None
            else [self.sources[e.source_model].get for e in cfg.experts]
        )
        for name, _ in layout.specs:
            if ".mlp." in name:
                break
            yield name, base.get(name).to(out_dtype)
        for layer in range(gates.shape[0]):
            gate_up, down = [], []
            for e, tensors_of in zip(cfg.experts, get, strict=True):
                w = {}
                for proj in _PROJ_ORDER:
                    t = tensors_of(f"model.layers.{layer}.mlp.{proj}.weight")
                    if e.noise_scale is not None:
                        t = t + torch.randn(t.shape, generator=gen, dtype=t.dtype) * e.noise_scale
                    if proj == "down_proj" and e.residual_scale is not None:
                        t = t * e.residual_scale
                    w[proj] = t.to(out_dtype)
                gate_up.append(torch.cat([w["gate_proj"], w["up_proj"]], dim=0))
                down.append(w["down_proj"])
            yield f"model.layers.{layer}.mlp.experts.gate_up_proj", torch.stack(gate_up)
            yield f"model.layers.{layer}.mlp.experts.down_proj", torch.stack(down)
        for layer in range(gates.shape[0]):
            yield f"model.layers.{layer}.mlp.gate.weight", gates[layer].to(out_dtype).contiguous()

    def run(
        self,
        cfg: MoEConfig,
        layout: MoELayout,
        sink: Callable[[str, torch.Tensor], None],
        experts: Sequence[ExpertTensors] | None = None,
    ) -> MoEResult:
        """Hand every output tensor to ``sink`` in order, checking names, shapes and finiteness.

        Raises:
            EvomergeError: an expert tensor of the wrong shape, or a non-finite output tensor.
        """
        start = time.perf_counter()
        per: dict[str, str] = {}
        shapes = dict(layout.specs)
        order = iter(layout.specs)
        nbytes = 0
        with torch.no_grad():
            for name, t in self.tensors(cfg, layout, experts):
                expected, shape = next(order)
                if name != expected:  # pragma: no cover - tensors() follows layout()
                    raise RuntimeError(f"MoE builder produced {name}, expected {expected}")
                _check_output(cfg.source_file or "MoE", name, t, shape)
                per[name] = tensor_digest(t)
                nbytes += t.numel() * t.element_size()
                sink(name, t)
        tensors = tensors_digest(per, shapes)
        digest = hashlib.sha256(
            f"{tensors}|experts_per_token={cfg.experts_per_token}".encode()
        ).hexdigest()
        return MoEResult(digest, time.perf_counter() - start, len(per), nbytes, tensors, per)

    def build_model(self, layout: MoELayout) -> torch.nn.Module:
        """An empty ``MixtralForCausalLM`` of the layout, on this builder's device."""
        from transformers import MixtralForCausalLM

        with no_init_weights():
            model = model_from_config(MixtralForCausalLM, layout.config, torch_dtype(layout.dtype))
        return model.to(self.device).eval()

    def build_into(
        self,
        model: torch.nn.Module,
        cfg: MoEConfig,
        layout: MoELayout,
        experts: Sequence[ExpertTensors] | None = None,
    ) -> MoEResult:
        """Write a mixture's tensors into ``model`` (built by :meth:`build_model` for the same layout)."""
        params: Mapping[str, torch.Tensor] = model.state_dict(keep_vars=True)

        def sink(name: str, t: torch.Tensor) -> None:
            params[name].data.copy_(t)

        result = self.run(cfg, layout, sink, experts)
        if getattr(layout.config, "tie_word_embeddings", False):
            model.tie_weights()  # type: ignore[operator]
        return result
