"""The model of a data-flow candidate, built over resident source tensors with nothing copied.

Every source's tensors are held once, on the device and in the model's dtype, each wrapped once in a
``torch.nn.Parameter`` that shares its storage. A candidate's model is one ``transformers`` model
whose embeddings, final norm and head are those parameters and whose layer list holds one decoder
layer module per step: a module of the architecture's own class, built on the meta device and then
pointed at the source layer's parameters. A layer used twice gets two modules over the same
parameters, each with its own ``layer_idx`` (its place in the KV cache) and the layer type it had in
its source (``sliding_attention``...); the model's config lists the layer types in path order.

Step ``i``'s output projections (the tensors that write into the residual stream, ``o_proj`` and
``down_proj``) are multiplied by ``c_i`` through forward hooks on that step's module, which computes
what the exported weights ``c_i * W`` compute (see :mod:`evomerge.dataflow.candidate`). Step modules
are cached by (source, layer, occurrence in the path), so a trial re-points a list and a few numbers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.dtypes import torch_dtype
from evomerge.engine.arch import Arch, detect_arch, is_pre_tensor
from evomerge.engine.resident import build_model
from evomerge.errors import ConfigError

__all__ = [
    "WRITERS",
    "LayerSource",
    "PathBuilder",
    "check_compatible",
    "layer_parameters",
    "resolve_dtype",
]

# The modules whose outputs are added to the residual stream, per model type: in these pre-norm
# architectures every layer reads the stream through an RMSNorm first, so scaling what is added
# scales the stream (the embedding keeps factor 1). Post-norm or sandwich-norm models (Gemma 2/3,
# OLMo 2) normalize what a layer adds and are refused: scaling o_proj would change nothing there.
WRITERS: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
}
_SCALE = "_evomerge_out_scale"  # the attribute the hooks read, on each step module


@dataclass
class LayerSource:
    """One source's tensors, resident (on the model's device, in its dtype).

    Attributes:
        name: the source's name (its reference, or a merged source's label).
        config: its ``config.json``.
        arch: where its layers are.
        params: checkpoint name -> a parameter sharing the resident tensor's storage.
    """

    name: str
    config: dict[str, Any]
    arch: Arch
    params: dict[str, torch.nn.Parameter] = field(repr=False)

    @classmethod
    def hold(
        cls,
        name: str,
        config: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> LayerSource:
        """Hold ``tensors`` on ``device`` in ``dtype`` (a conversion happens here, once per study)."""
        params = {
            n: torch.nn.Parameter(
                t.to(device, dtype) if t.is_floating_point() else t.to(device), requires_grad=False
            )
            for n, t in tensors.items()
        }
        return cls(name, dict(config), detect_arch(config, params), params)

    @property
    def layer_types(self) -> list[Any] | None:
        lt = self.config.get("layer_types")
        return list(lt) if isinstance(lt, list) else None

    def layer(self, index: int) -> dict[str, torch.nn.Parameter]:
        """The parameters of layer ``index`` by their name within the layer."""
        prefix = f"{self.arch.layer_prefix}.{index}."
        return {n[len(prefix) :]: p for n, p in self.params.items() if n.startswith(prefix)}


def layer_parameters(source: LayerSource) -> tuple[int, int]:
    """``(parameters outside the layers, parameters per layer)`` of a source (for ``max_params``)."""
    outside = sum(p.numel() for n, p in source.params.items() if source.arch.split(n) is None)
    per = sum(p.numel() for p in source.layer(0).values())
    return outside, per


# Config values every layer computes with: the model is built with the first source's.
_SAME = (
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "sliding_window",
    "tie_word_embeddings",
)

Item = tuple[str, Mapping[str, Any], Mapping[str, tuple[int, ...]], str]


def check_compatible(items: Sequence[Item], file: str | None) -> None:
    """Sources whose layers can follow one another in one model.

    Args:
        items: per source ``(name, config, {tensor name within layer 0: shape}, field)``.
        file: names the space file in messages.

    Raises:
        ConfigError: a model type whose layers the export cannot scale (see :data:`WRITERS`),
            another model type, hidden size, vocabulary or config value the layers compute with,
            or layers with other tensors or shapes.
    """
    name0, cfg0, shapes0, fld0 = items[0]
    mt = cfg0.get("model_type")
    if mt not in WRITERS:
        raise ConfigError(
            file,
            fld0,
            f"{name0} is a {mt!r} model; data-flow paths take pre-norm models whose layers write to the stream through o_proj and down_proj ({', '.join(WRITERS)})",
        )
    for name, cfg, shapes, fld in items[1:]:
        for key in ("model_type", *_SAME):
            if cfg.get(key) != cfg0.get(key):
                what = {"vocab_size": "vocabularies", "hidden_size": "hidden sizes"}.get(
                    key, f"{key} values"
                )
                raise ConfigError(
                    file,
                    fld,
                    f"sources of different {what}: {name0} has {key} {cfg0.get(key)!r}, {name} has {cfg.get(key)!r}; a path runs each source's layers on one stream",
                )
        if dict(shapes) != dict(shapes0):
            diff = sorted(set(shapes) ^ set(shapes0)) or [
                k for k in shapes if shapes[k] != shapes0[k]
            ]
            raise ConfigError(
                file,
                fld,
                f"the layers of {name} and {name0} differ ({diff[0]}); a path needs layers of one shape",
            )


def _scale_output(module: torch.nn.Module, args: Any, output: Any) -> Any:
    c = getattr(module, _SCALE)
    return output if c == 1.0 else output * c


class PathBuilder:
    """Builds candidates' models over resident sources (see the module docstring).

    Args:
        sources: the sources, by name; the first gives the config every step module is built with
            (what mergekit's output takes from the first model), apart from each layer's type.
        device: where the model lives (the sources' tensors are already there).
        dtype: the model's dtype name.

    Raises:
        ConfigError: from :func:`check_compatible`.
    """

    def __init__(
        self, sources: Mapping[str, LayerSource], device: torch.device, dtype: str
    ) -> None:
        self.sources = dict(sources)
        first = next(iter(self.sources.values()))
        check_compatible(
            [
                (
                    s.name,
                    s.config,
                    {k: tuple(p.shape) for k, p in s.layer(0).items()},
                    "dataflow.sources",
                )
                for s in self.sources.values()
            ],
            None,
        )
        self.arch = first.arch
        self.writers = WRITERS[first.config["model_type"]]
        shell_cfg = dict(first.config)
        shell_cfg["num_hidden_layers"] = 0
        if isinstance(shell_cfg.get("layer_types"), list):
            # One layer of each type the sources have (their list is removed below): a model reads
            # at construction which types it must prepare masks for.
            kinds = sorted({str(t) for s in self.sources.values() for t in s.layer_types or ()})
            shell_cfg["num_hidden_layers"], shell_cfg["layer_types"] = len(kinds), kinds
        self.model: Any = build_model(shell_cfg, dtype, device)  # a transformers model
        self.config: Any = self.model.config
        prefix = self.arch.layer_prefix or ""
        layers = self.model.get_submodule(prefix)
        if not isinstance(layers, torch.nn.ModuleList):
            raise ConfigError(
                None,
                "dataflow.sources",
                f"{first.name}: its layers ({prefix}) are not a module list",
            )
        self.layers: torch.nn.ModuleList = layers
        self.layers._modules.clear()  # the shell's own layers: each path brings its steps
        self._layer_cls = _layer_class(self.config, prefix)
        self._configs: dict[Any, Any] = {}
        self._steps: dict[tuple[str, int, int], torch.nn.Module] = {}
        self._outside = [
            n for n in self.model.state_dict(keep_vars=True) if self.arch.split(n) is None
        ]
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))

    def build(self, steps: Sequence[tuple[str, int, float]]) -> torch.nn.Module:
        """Point the model at a path: ``(source, layer, output scale c_i)`` per step.

        Returns:
            The model (the same object for every path; its previous path is gone).

        Raises:
            ConfigError: a layer beyond its source's layers.
        """
        seen: dict[tuple[str, int], int] = {}
        modules = []
        types = []
        for k, (name, layer, c) in enumerate(steps):
            src = self.sources[name]
            if not 0 <= layer < src.arch.num_layers:
                raise ConfigError(
                    None,
                    f"path[{k}]",
                    f"layer {layer} is beyond {name}'s {src.arch.num_layers} layers",
                )
            occ = seen.get((name, layer), 0)
            seen[(name, layer)] = occ + 1
            m = self._step((name, layer, occ))
            for sub in m.modules():
                if hasattr(sub, "layer_idx"):
                    setattr(sub, "layer_idx", k)  # noqa: B010  # its own place in the KV cache
            for w in self.writers:
                setattr(m.get_submodule(w), _SCALE, float(c))
            modules.append(m)
            types.append(_type_of(src, layer))
        self.layers._modules.clear()
        for m in modules:
            self.layers.append(m)
        self.config.num_hidden_layers = len(modules)
        if isinstance(getattr(self.config, "layer_types", None), list):
            self.config.layer_types = types
        self._point_outside(steps[0][0], steps[-1][0])
        return self.model

    def _point_outside(self, first: str, last: str) -> None:
        """Embeddings from the first step's source, final norm and head from the last step's
        (mergekit's passthrough: the first and the last slice); a tied head is the embedding."""
        for n in self._outside:
            if n.endswith("lm_head.weight") and self.tied:
                continue
            src = self.sources[first if is_pre_tensor(n) else last]
            p = src.params.get(n)
            if p is None and n.endswith("lm_head.weight"):  # a tied checkpoint stores no head
                p = next(
                    q
                    for k, q in src.params.items()
                    if is_pre_tensor(k) and k.endswith("embed_tokens.weight")
                )
            if p is None:
                raise ConfigError(None, "dataflow.sources", f"{src.name} has no tensor {n}")
            _set(self.model, n, p)
        if self.tied:
            out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
            out.weight = inp.weight

    def _step(self, key: tuple[str, int, int]) -> torch.nn.Module:
        m = self._steps.get(key)
        if m is not None:
            return m
        name, layer, _ = key
        src = self.sources[name]
        cfg = self._config_for(_type_of(src, layer))
        with torch.device("meta"):
            m = self._layer_cls(cfg, 0)
        for n, p in src.layer(layer).items():
            _set(m, n, p)
        left = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
        if left:
            raise ConfigError(
                None,
                "dataflow.sources",
                f"{name}: layer {layer} has no tensor {left[0]} (a layer module holds more than its checkpoint)",
            )
        for w in self.writers:
            sub = m.get_submodule(w)
            setattr(sub, _SCALE, 1.0)
            sub.register_forward_hook(_scale_output)
        m.eval()
        self._steps[key] = m
        return m

    def _config_for(self, layer_type: Any) -> Any:
        """The shell's config for one layer of ``layer_type`` (built at index 0, re-indexed after)."""
        cfg = self._configs.get(layer_type)
        if cfg is None:
            cfg = copy.deepcopy(self.config)
            cfg.num_hidden_layers = 1
            if layer_type is not None:
                cfg.layer_types = [layer_type]
            self._configs[layer_type] = cfg
        return cfg


def _type_of(src: LayerSource, layer: int) -> Any:
    types = src.layer_types
    return types[layer] if types is not None and layer < len(types) else None


def _set(root: torch.nn.Module, name: str, p: torch.nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, p)


def _layer_class(config: Any, prefix: str) -> Any:
    """The architecture's decoder layer class (from a one-layer model on the meta device)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 1
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = ["full_attention"]
    with torch.device("meta"):
        tmpl = AutoModelForCausalLM.from_config(cfg)
    return type(tmpl.get_submodule(prefix)[0])


def resolve_dtype(name: str | None, config: Mapping[str, Any]) -> str:
    """The model's dtype name: ``name``, else the first source's stored dtype, else float32."""
    if name:
        torch_dtype(name)  # raises on an unknown name
        return name
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(stored)
