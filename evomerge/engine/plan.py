"""The merge planner: a recipe and its opened models become a list of tensor tasks.

One planner serves both paths. ``evomerge merge`` streams the tasks to disk; the search writes them
into a resident model. A task names its output tensor, its inputs (model, tensor name), which input
is the base, and fully resolved parameters, so executing a plan needs no recipe logic at all.

Order and naming follow mergekit: the tensors before the layers (embeddings) come from the first
slice's models, then each slice's layers are renumbered consecutively, then the tensors after the
layers (final norm, lm_head) come from the last slice's models. A ``models:`` recipe is one slice
covering every layer of every model, the base included even when unlisted. Within a slice of n
layers, layer i has relative depth t = i / (n - 1) (t = 1 for a one-layer slice, as in mergekit);
the tensors outside the layers take t = 0, except those of another module's stack (a
vision-language model's vision tower), which take their depth within that stack
(:meth:`~evomerge.engine.arch.Arch.depth`): mergekit plans each module of such a model on its own.
Slices cut the language model's layers only; another module comes whole from the first slice's
models (mergekit asks for ``modules:`` there).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.dtypes import name_of_code, torch_dtype
from evomerge.engine.arch import is_other_module, is_pre_tensor
from evomerge.engine.params import ParamError, resolve
from evomerge.engine.sources import ModelSource
from evomerge.errors import ConfigError
from evomerge.recipe.schema import InputModel, MergeConfig, OutputSlice

__all__ = ["TensorTask", "MergePlan", "make_plan"]

_TIED_HEADS = ("lm_head.weight",)
_EMBED_NAMES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: where its inputs come from and the parameters to merge them with.

    ``decision_dtype`` is the dtype mergekit computes this tensor in: the recipe's ``dtype``, else
    the promotion of the inputs' stored dtypes. Kernels compute in float32 (``compute_dtype``), but
    a discrete choice that rounding can flip (arcee_fusion's mask) is made in this dtype, as
    mergekit makes it.
    """

    out_name: str
    inputs: tuple[tuple[str, str], ...]  # (model reference, tensor name in that model)
    base: int | None
    shared: Mapping[str, Any]
    per_input: tuple[Mapping[str, Any], ...]
    shape: tuple[int, ...]
    decision_dtype: str = "float32"


@dataclass
class MergePlan:
    """Everything needed to execute a merge, with no recipe logic left.

    Attributes:
        recipe: the recipe it was planned from.
        tasks: output tensors in checkpoint order.
        reference: the model whose config, tokenizer and generation config the output copies.
        out_config: the output ``config.json`` (layer count updated).
        num_layers: output layer count.
        out_dtype: dtype name of the saved tensors.
        compute_dtype: dtype name the kernels run in.
        parents: every model that contributes, in order.
    """

    recipe: MergeConfig
    tasks: list[TensorTask]
    reference: str
    out_config: dict[str, Any]
    num_layers: int
    out_dtype: str
    compute_dtype: str
    parents: list[str] = field(default_factory=list)


def _normalized_slices(cfg: MergeConfig, sources: Mapping[str, ModelSource]) -> list[OutputSlice]:
    if cfg.slices is not None:
        return list(cfg.slices)
    assert cfg.models is not None
    items = list(cfg.models)
    if cfg.base_model and cfg.base_model not in [m.model for m in items]:
        items.append(InputModel(cfg.base_model))
    counts = {m.model: sources[m.model].arch.num_layers for m in items}
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise ConfigError(
            cfg.source_file,
            "models",
            f"models have different layer counts ({detail}); use slices: with matching layer_range",
        )
    return [
        OutputSlice(tuple(InputModel(m.model, m.parameters, (0, counts[m.model])) for m in items))
    ]


def _promoted(codes: Sequence[str]) -> str:
    """The float dtype mergekit computes in when a recipe sets none: the inputs' promoted."""
    floats = [torch_dtype(n) for c in codes if (n := name_of_code(c)) is not None]
    if not floats:
        return "float32"
    dtype = floats[0]
    for d in floats[1:]:
        dtype = torch.promote_types(dtype, d)
    return str(dtype).removeprefix("torch.")


def _input_name(src: ModelSource, name: str) -> str | None:
    if name in src:
        return name
    if name.endswith(_TIED_HEADS):
        # A model with tied embeddings stores no lm_head: its head is the embedding matrix.
        for emb in src.names():
            if emb.endswith(_EMBED_NAMES):
                return emb
    return None


def make_plan(
    cfg: MergeConfig, sources: Mapping[str, ModelSource], *, allow_crimes: bool = False
) -> MergePlan:
    """Plan a merge.

    Args:
        cfg: the validated recipe.
        sources: every referenced model, opened (see :func:`~evomerge.engine.sources.open_sources`).
        allow_crimes: allow models of different architectures (tensor shapes must still match).

    Returns:
        The :class:`MergePlan`.

    Raises:
        ConfigError: layer ranges out of bounds, mismatched architectures or shapes, missing tensors,
            parameters that cannot be resolved for some tensor.
    """
    file = cfg.source_file
    method = cfg.method
    slices = _normalized_slices(cfg, sources)
    reference = cfg.base_model or slices[0].sources[0].model
    ref_src = sources[reference]
    ref_arch = ref_src.arch

    for ref in cfg.referenced_models():
        a = sources[ref].arch
        if not allow_crimes and not a.compatible(ref_arch):
            raise ConfigError(
                file,
                None,
                f"models have different architectures: {reference!r} is {ref_arch.model_type} {list(ref_arch.architectures)}, {ref!r} is {a.model_type} {list(a.architectures)} (--allow-crimes merges them when tensor shapes match)",
            )
    for si, s in enumerate(slices):
        for j, src in enumerate(s.sources):
            n = sources[src.model].arch.num_layers
            lo, hi = src.layer_range or (0, n)
            if sources[src.model].arch.layer_prefix is None:
                raise ConfigError(
                    file,
                    f"slices[{si}].sources[{j}]",
                    f"model {src.model!r}: no layer stack found in its tensor names",
                )
            if hi > n:
                raise ConfigError(
                    file,
                    f"slices[{si}].sources[{j}].layer_range",
                    f"[{lo}, {hi}] is beyond model {src.model!r}, which has {n} layers (allowed: 0 <= start < end <= {n})",
                )

    stacks = {0, ref_arch.num_layers} | {n for _, n in ref_arch.other_stacks}
    for name, end in cfg.module_spans:
        if end not in stacks:
            raise ConfigError(
                file,
                f"modules.{name}",
                f"layer_range [0, {end}] covers no whole layer stack of {reference!r} (its stacks have {', '.join(str(n) for n in sorted(stacks - {0}))} layers); several modules are merged as one models: recipe, every layer of every stack",
            )

    ref_layer_shapes: dict[str, tuple[int, ...]] = {}
    for name in ref_src.names():
        sp = ref_arch.split(name)
        if sp is not None and sp[1] not in ref_layer_shapes:
            ref_layer_shapes[sp[1]] = ref_src.shape(name)

    tasks: list[TensorTask] = []

    def add(
        out_name: str,
        s: OutputSlice,
        si: int,
        in_names: list[str],
        t: float,
        expect: tuple[int, ...] | None,
    ) -> None:
        base_ref = s.base_model or cfg.base_model
        models = [src.model for src in s.sources]
        base = models.index(base_ref) if (base_ref in models and method.base != "ignored") else None
        shapes = [sources[m].shape(n) for m, n in zip(models, in_names, strict=False)]
        if any(sh != shapes[0] for sh in shapes):
            detail = ", ".join(f"{m}: {list(sh)}" for m, sh in zip(models, shapes, strict=False))
            hint = (
                " (vocabularies differ: evomerge merges models with the same tokenizer)"
                if is_pre_tensor(out_name) or out_name.endswith(_TIED_HEADS)
                else ""
            )
            raise ConfigError(
                file,
                f"slices[{si}]" if cfg.slices else "models",
                f"tensor {out_name} has different shapes: {detail}{hint}",
            )
        if expect is not None and shapes[0] != expect:
            raise ConfigError(
                file,
                f"slices[{si}]",
                f"tensor {out_name} would be {list(shapes[0])} but the output model ({reference}) needs {list(expect)}: slices mix incompatible models",
            )
        try:
            shared, per_input = resolve(
                method,
                out_name=out_name,
                in_names=in_names,
                source_params=[src.parameters for src in s.sources],
                slice_params=s.parameters,
                global_params=cfg.parameters,
                base=base,
                t=t,
            )
        except ParamError as e:
            raise ConfigError(file, "parameters", str(e)) from None
        why = method.check_inputs(len(models), base is not None)
        if why:
            raise ConfigError(file, f"slices[{si}]" if cfg.slices else "models", why)
        tasks.append(
            TensorTask(
                out_name,
                tuple(zip(models, in_names, strict=False)),
                base,
                shared,
                tuple(per_input),
                shapes[0],
                cfg.dtype
                or _promoted(
                    [sources[m].dtype_code(n) for m, n in zip(models, in_names, strict=True)]
                ),
            )
        )

    def outside(first_slice: OutputSlice, si: int, pre: bool) -> None:
        for name in ref_src.names():
            # Another module (a vision tower) comes whole from the first slice's models, with the embeddings.
            if (
                ref_arch.split(name) is not None
                or (is_pre_tensor(name) or is_other_module(name)) != pre
            ):
                continue
            in_names = []
            for src in first_slice.sources:
                n = _input_name(sources[src.model], name)
                if n is None:
                    raise ConfigError(file, None, f"model {src.model!r} has no tensor {name}")
                in_names.append(n)
            add(name, first_slice, si, in_names, ref_arch.depth(name), None)

    outside(slices[0], 0, pre=True)
    out_layer = 0
    layer_types: list[Any] = []
    for si, s in enumerate(slices):
        first = s.sources[0]
        lo0 = (first.layer_range or (0, 0))[0]
        length = (first.layer_range or (0, 0))[1] - lo0
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            first_src = sources[first.model]
            suffixes = [
                sp[1]
                for n in first_src.names()
                if (sp := first_src.arch.split(n)) is not None and sp[0] == lo0 + offset
            ]
            for suffix in suffixes:
                in_names = []
                for src in s.sources:
                    m = sources[src.model]
                    name = m.arch.layer_name((src.layer_range or (0, 0))[0] + offset, suffix)
                    if name not in m:
                        raise ConfigError(
                            file,
                            f"slices[{si}]" if cfg.slices else "models",
                            f"model {src.model!r} has no tensor {name}",
                        )
                    in_names.append(name)
                add(
                    ref_arch.layer_name(out_layer, suffix),
                    s,
                    si,
                    in_names,
                    t,
                    ref_layer_shapes.get(suffix),
                )
            types = _layer_types(first_src.config, first_src.arch.count_key)
            layer_types.append(types[lo0 + offset] if types and lo0 + offset < len(types) else None)
            out_layer += 1
    outside(slices[-1], len(slices) - 1, pre=False)

    out_config = copy.deepcopy(ref_src.config)
    if ref_arch.count_key is not None:
        holder = out_config
        for k in ref_arch.count_key[:-1]:
            holder = holder[k]
        holder[ref_arch.count_key[-1]] = out_layer
        if isinstance(holder.get("layer_types"), list) and all(x is not None for x in layer_types):
            holder["layer_types"] = layer_types
    first_dtype = ref_src.dtype_code(next(ref_src.names())) if tasks else "F32"
    out_dtype = cfg.out_dtype or cfg.dtype or (name_of_code(first_dtype) or "float32")
    if "torch_dtype" in out_config or "dtype" not in out_config:
        out_config["torch_dtype"] = out_dtype
    if "dtype" in out_config:
        out_config["dtype"] = out_dtype
    compute = "float64" if cfg.dtype == "float64" else "float32"
    parents = list(dict.fromkeys(m for task in tasks for m, _ in task.inputs))
    return MergePlan(cfg, tasks, reference, out_config, out_layer, out_dtype, compute, parents)


def _layer_types(config: Mapping[str, Any], count_key: tuple[str, ...] | None) -> list[Any] | None:
    holder: Any = config
    for k in (count_key or ("",))[:-1]:
        holder = holder.get(k, {})
    lt = holder.get("layer_types") if isinstance(holder, Mapping) else None
    return lt if isinstance(lt, list) else None
