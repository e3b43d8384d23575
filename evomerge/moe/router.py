"""Router weights of a mixture of experts: one vector per layer and expert, by ``gate_mode``.

- ``hidden``: the base model reads each expert's positive prompts (a beginning-of-sequence token
  before each, a left-padded batch padded with that token); at every layer the hidden state entering
  the layer at the last position, averaged over the prompts, is the expert's router row. Negative
  prompts are handled the same way and subtracted; each row is then scaled to unit L2 norm. This is
  mergekit-moe's computation, including its precision: the base runs in bfloat16, as mergekit-moe
  loads it, so that the routers agree (tested against mergekit-moe 0.1.5).
- ``cheap_embed``: the same, from the sum of the prompts' token embeddings (unit norm), the same
  vector at every layer.
- ``random``: standard normal rows; ``uniform_random``: uniform in ``±1/sqrt(hidden_size)``, as
  ``torch.nn.Linear`` initialises weights. Both draw from a generator seeded by ``--seed``, in the
  order mergekit-moe draws from torch's global generator, so ``--seed S`` here equals
  ``--random-seed S`` there.

A :class:`Router` keeps the base model and tokenizer it loaded and the hidden states of every
prompt list it ran, so a search that varies prompts, experts or ``experts_per_token`` runs the base
once per distinct prompt list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from evomerge.compat import no_init_weights
from evomerge.engine.sources import ModelSource
from evomerge.errors import EvomergeError, one_line
from evomerge.moe.config import Expert

__all__ = ["Router", "HIDDEN_DTYPE"]

# The precision of the base model's forward pass for gate_mode hidden (mergekit-moe's).
HIDDEN_DTYPE = torch.bfloat16


class Router:
    """Computes router weights for configurations over one base model.

    Args:
        base: the opened base model.
        device: where the base model runs for ``hidden``.
    """

    def __init__(self, base: ModelSource, device: str | torch.device = "cpu") -> None:
        self.base = base
        self.device = torch.device(device)
        self.num_layers = int(base.config["num_hidden_layers"])
        self.hidden_size = int(base.config["hidden_size"])
        self._tokenizer: Any = None
        self._model: torch.nn.Module | None = None
        self._cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    def gates(
        self, mode: str, experts: Sequence[Expert], generator: torch.Generator
    ) -> torch.Tensor:
        """Router weights, shape ``(layers, experts, hidden_size)``.

        Args:
            mode: the gate mode.
            experts: the experts, in output order.
            generator: the seeded generator random modes draw from.

        Returns:
            A CPU tensor (bfloat16 for ``hidden``, float32 otherwise).
        """
        shape = (self.num_layers, len(experts), self.hidden_size)
        if mode == "random":
            return torch.randn(shape, generator=generator)
        if mode == "uniform_random":
            scale = math.sqrt(1.0 / self.hidden_size)
            return torch.rand(shape, generator=generator) * 2 * scale - scale
        rows = []
        for e in experts:
            v = self._states(mode, e.positive_prompts)
            if e.negative_prompts:
                v = v - self._states(mode, e.negative_prompts)
            rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
        return torch.stack(rows, dim=0).permute(1, 0, 2).contiguous()

    def _states(self, mode: str, prompts: tuple[str, ...]) -> torch.Tensor:
        """Per-layer vectors ``(layers, hidden_size)`` of a prompt list (cached)."""
        key = (mode, prompts)
        if key not in self._cache:
            batch = self._tokenize(prompts)
            self._cache[key] = self._hidden(batch) if mode == "hidden" else self._embedded(batch)
        return self._cache[key]

    def _tokenize(self, prompts: tuple[str, ...]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer()
        return dict(
            tok(
                [(tok.bos_token or "") + p for p in prompts],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
        )

    def tokenizer(self) -> Any:
        """The base model's tokenizer, left-padding with its beginning-of-sequence token."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(str(self.base.path))
            except Exception as e:  # no tokenizer files, an unreadable one
                raise EvomergeError(
                    f"model {self.base.ref!r}: cannot load its tokenizer to route by prompts ({one_line(e)[:200]}); use gate_mode random"
                ) from None
            tok.padding_side = "left"
            tok.pad_token_id = tok.bos_token_id
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def _embedded(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        embed = self.base.get("model.embed_tokens.weight")
        onehot = torch.nn.functional.one_hot(batch["input_ids"], num_classes=embed.shape[0]).float()
        h = (onehot @ embed.float()) * batch["attention_mask"].unsqueeze(-1)
        total = h.sum(dim=1).sum(dim=0, keepdim=True)
        return (total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(self.num_layers, 1)

    def _hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self._base_model()
        with torch.no_grad():
            out = model(
                **{k: v.to(self.device) for k, v in batch.items()},
                output_hidden_states=True,
                return_dict=True,
            )
        states = torch.stack(out.hidden_states[:-1])[
            :, :, -1, :
        ]  # (layers, prompts, hidden): entering each layer, last position
        return (states.sum(dim=1) / states.shape[1]).cpu()

    def _base_model(self) -> torch.nn.Module:
        """The base as a transformers model in :data:`HIDDEN_DTYPE`, its weights from the opened source."""
        if self._model is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            with no_init_weights():
                model = AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(str(self.base.path)), dtype=HIDDEN_DTYPE
                )
            missing = set(
                model.load_state_dict(
                    {n: self.base.get(n) for n in self.base.names()}, strict=False
                ).missing_keys
            )
            model.tie_weights()
            if missing - {"lm_head.weight"} or (
                "lm_head.weight" in missing and not model.config.tie_word_embeddings
            ):
                raise EvomergeError(
                    f"model {self.base.ref!r}: its checkpoint lacks {sorted(missing)[0]}, which its config needs"
                )
            self._model = model.to(self.device).eval()
        return self._model

    def release(self) -> None:
        """Drop the base model (the cached hidden states stay)."""
        self._model = None
