"""One test per private API of Optuna, lm-eval and transformers that evomerge uses
(``evomerge.compat``): a release that changes one fails here, naming it."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from _tiny import llava_config, make_tiny
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from evomerge import compat
from evomerge.evaluation.tasks import get_task_dict, leaf_tasks, manager_for, quiet_lm_eval
from evomerge.zoo.data import make_tokenizer

optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- Optuna ---------------------------------------------------------------------------------------


def _study() -> optuna.Study:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(6):
        trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
        if i == 2:
            study.tell(trial, state=TrialState.PRUNED)
        elif i == 4:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, trial.params["x"])
    return study


def test_study_trials_are_the_study_s_trials():
    study = _study()
    got = compat.study_trials(study)
    assert [t.number for t in got] == [t.number for t in study.get_trials()]
    assert [t.state for t in got] == [t.state for t in study.get_trials()]
    pruned = compat.study_trials(study, states=(TrialState.PRUNED,), use_cache=True)
    assert [t.number for t in pruned] == [2]


class _Recording:
    """A study seen through a view that defines ``compat.SAMPLER_TRIALS``, recording its calls."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        self.calls: list[dict] = []
        setattr(self, compat.SAMPLER_TRIALS, self._trials)

    def __getattr__(self, name: str):
        return getattr(self._study, name)

    def _trials(self, deepcopy=True, states=None, use_cache=False):
        self.calls.append({"deepcopy": deepcopy, "states": states, "use_cache": use_cache})
        return compat.study_trials(
            self._study, deepcopy=deepcopy, states=states, use_cache=use_cache
        )


@pytest.mark.parametrize("name", ["tpe", "gp"])
def test_optuna_samplers_read_trials_through_the_private_method(name):
    """What StoppedAsEstimated relies on: a sampler given a view of the study reads the trials
    through the view's ``_get_trials``, with the keyword arguments the view takes."""
    study = _study()
    sampler = (
        optuna.samplers.TPESampler(seed=0, n_startup_trials=0)
        if name == "tpe"
        else optuna.samplers.GPSampler(seed=0, n_startup_trials=0)
    )
    view = _Recording(study)
    trial = study.ask()
    frozen = study._storage.get_trial(trial._trial_id)
    sampler.sample_independent(view, frozen, "x", FloatDistribution(0.0, 1.0))  # type: ignore[arg-type]
    assert view.calls, f"{type(sampler).__name__} did not call study.{compat.SAMPLER_TRIALS}"
    assert all(set(c) == {"deepcopy", "states", "use_cache"} for c in view.calls)


# --- lm-eval --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hflm_cls():
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    return HFLM


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny(tmp_path_factory.mktemp("m") / "llama", seed=3, max_position_embeddings=256)
    ).eval()
    tok = make_tokenizer()
    tok.model_max_length = 256
    return model, tok


def test_hflm_hands_tokenized_requests_to_the_private_method(hflm_cls, tiny_lm):
    """``HFLM.loglikelihood`` calls ``_loglikelihood_tokens`` with ``(key, context tokens,
    continuation tokens)``; the subclass's override sees them, HFLM's own method scores them."""
    from lm_eval.api.instance import Instance

    seen: list = []

    class Spy(hflm_cls):  # type: ignore[misc, valid-type]
        pass

    def spy(self, requests, disable_tqdm=False, override_bs=None):
        seen.extend(requests)
        return compat.hflm_loglikelihood_tokens(self, requests, disable_tqdm=True)

    setattr(Spy, compat.HFLM_TOKENS, spy)
    model, tok = tiny_lm
    lm = Spy(pretrained=model, tokenizer=tok, device="cpu", batch_size=2)
    args = [("rot: abc =", " bca"), ("rot: abc =", " cab"), ("sort: cba =", " abc")]
    got = lm.loglikelihood(
        [
            Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i)
            for i, a in enumerate(args)
        ],
        disable_tqdm=True,
    )
    assert [key for key, _, _ in seen] == args
    assert all(isinstance(c, list) and isinstance(c[0], int) for _, c, _ in seen)
    plain = hflm_cls(pretrained=model, tokenizer=tok, device="cpu", batch_size=2)
    want = plain.loglikelihood(
        [
            Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i)
            for i, a in enumerate(args)
        ],
        disable_tqdm=True,
    )
    assert [g for _, g in got] == [g for _, g in want]
    assert all(abs(a - b) < 1e-5 for (a, _), (b, _) in zip(got, want, strict=True))
    assert all(v < 0 for v, _ in got)


def test_the_cache_hook_receives_each_answer(hflm_cls, tiny_lm):
    from lm_eval.api.model import CacheHook, hash_args

    class Caching:  # what lm-eval's CachingLM hands its hook
        dbdict: dict = {}

    model, tok = tiny_lm
    lm = hflm_cls(pretrained=model, tokenizer=tok, device="cpu", batch_size=2)
    lm.set_cache_hook(CacheHook(Caching()))  # type: ignore[arg-type]
    compat.feed_cache_hook(lm, ("ctx", " x"), (-1.5, True))
    assert Caching.dbdict == {hash_args("loglikelihood", ("ctx", " x")): (-1.5, True)}


def _write_task(folder: Path, n: int = 6) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"q": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(n)]
    (folder / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "compat_mc.yaml").write_text(
        f"task: compat_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'test.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return "compat_mc"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task")
    name = _write_task(folder)
    return leaf_tasks(get_task_dict([name], manager_for([name], str(folder))))[name]


def test_build_task_requests_builds_the_chosen_docs(task, capfd):
    with compat.quiet_task_progress():
        compat.build_task_requests(task, [1, 4])
    assert len(task.instances) == 4  # two choices per doc
    # doc_id is the position among the chosen docs
    assert {(inst.doc_id, inst.arguments[0]) for inst in task.instances} == {(0, "q1:"), (1, "q4:")}
    assert "%|" not in capfd.readouterr().err  # no progress bar while building


CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_build_task_requests_renders_the_chat_template_with_shots_as_turns(
    hflm_cls, tiny_lm, tmp_path
):
    """With an LM to render prompts, each request's context is the chat template applied to the
    few-shot examples as user/assistant turns, then the item's prompt."""
    name = _write_task(tmp_path)
    t = leaf_tasks(get_task_dict([name], manager_for([name], str(tmp_path))))[name]
    t.set_config(key="num_fewshot", value=1)
    t.set_fewshot_seed(seed=0)
    model, tok = tiny_lm
    chat_tok = make_tokenizer()
    chat_tok.chat_template = CHAT
    lm = hflm_cls(pretrained=model, tokenizer=chat_tok, device="cpu", batch_size=2)
    with compat.quiet_task_progress():
        compat.build_task_requests(t, [2], chat=lm)
    contexts = {inst.arguments[0] for inst in t.instances}
    assert len(contexts) == 1
    (context,) = contexts
    assert context.startswith("<user>q") and context.endswith("<user>q2:</user><assistant>")
    assert context.count("<assistant>") == 2  # the shot's answer as an assistant turn


def test_task_filters_are_the_task_s_filter_ensembles(task, tmp_path):
    assert [f.name for f in compat.task_filters(task)] == ["none"]
    docs = [{"q": f"q{i}", "a": str(i)} for i in range(3)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "compat_gen.yaml").write_text(
        f"task: compat_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'g.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{q}}="\ndoc_to_target: "{{a}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n'
        "filter_list:\n"
        "  - name: strict\n    filter:\n      - function: regex\n        regex_pattern: '(\\d+)'\n      - function: take_first\n"
        "  - name: loose\n    filter:\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    gen = leaf_tasks(get_task_dict(["compat_gen"], manager_for(["compat_gen"], str(tmp_path))))
    ensembles = compat.task_filters(gen["compat_gen"])
    assert [f.name for f in ensembles] == ["strict", "loose"]
    steps = [getattr(s, "func", s).__name__ for s in ensembles[0].filters]
    assert steps == ["RegexFilter", "TakeFirstFilter"]
    assert compat.task_filters(object()) == []


def test_quiet_task_progress_swaps_the_module_global_and_restores_it():
    import lm_eval.api.task as lm_task

    before = lm_task.tqdm
    items = [1, 2, 3]
    with pytest.raises(RuntimeError), compat.quiet_task_progress():
        assert lm_task.tqdm is not before
        assert lm_task.tqdm(items, desc="x") is items  # a pass-through
        raise RuntimeError
    assert lm_task.tqdm is before


# --- transformers ---------------------------------------------------------------------------------


def test_no_init_weights_skips_torch_initialization():
    t = torch.zeros(16)
    with compat.no_init_weights():
        torch.nn.init.normal_(t)
        assert not t.any()
    torch.nn.init.normal_(t)
    assert t.any()


def test_sdpa_grouped_heads_hands_the_kernel_grouped_heads_on_cpu(monkeypatch, tmp_path):
    """Within the block, transformers' SDPA attention passes the key/value heads as they are
    (``enable_gqa``, fewer key heads than query heads) even with a padding mask; the logits are
    the same as without it, and the environment is as it was after the block."""
    import os

    import transformers.integrations.sdpa_attention as sdpa
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny(tmp_path / "llama", seed=1), attn_implementation="sdpa"
    ).eval()
    seen: list[tuple[bool, int, int]] = []
    kernel = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((bool(kwargs.get("enable_gqa")), q.shape[1], k.shape[1]))
        return kernel(q, k, v, *args, **kwargs)

    monkeypatch.setattr(sdpa.torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        assert seen and not any(gqa for gqa, _, _ in seen)
        seen.clear()
        with compat.sdpa_grouped_heads(torch.device("cpu")):
            grouped = model(input_ids=ids, attention_mask=mask).logits
    assert seen and all(gqa and q > k for gqa, q, k in seen)
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    assert torch.allclose(plain[:, 1:], grouped[:, 1:], atol=1e-5)
    with compat.sdpa_grouped_heads(torch.device("meta")):  # other devices: nothing changes
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ


def test_attention_implementation_switches_every_config_and_restores_it(tmp_path):
    """A registered attention function replaces sdpa within the block (it is called, the logits are
    sdpa's), and the model attends through sdpa again after it."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    model = AutoModelForCausalLM.from_pretrained(
        make_tiny(tmp_path / "llama", seed=1), attn_implementation="sdpa"
    ).eval()
    calls: list[int] = []

    def counted(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("evomerge_test_counted", counted)
    AttentionMaskInterface.register("evomerge_test_counted", sdpa_mask)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert compat.attention_implementations(model) == {"sdpa"}
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with compat.attention_implementation(model, "evomerge_test_counted"):
            assert compat.attention_implementations(model) == {"evomerge_test_counted"}
            switched = model(input_ids=ids).logits
        assert calls and sorted(set(calls)) == list(range(model.config.num_hidden_layers))
        calls.clear()
        again = model(input_ids=ids).logits
    assert not calls and compat.attention_implementations(model) == {"sdpa"}
    assert torch.equal(plain, switched) and torch.equal(plain, again)


def _llava_config():
    return llava_config(vision_layers=1, text_layers=1)


def test_the_causal_lm_auto_class_maps_config_classes():
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    assert hasattr(AutoModelForCausalLM, "_model_mapping"), "the auto class's mapping is gone"
    assert compat.has_causal_lm_class(LlamaConfig())
    assert compat.has_causal_lm_class(MistralConfig())
    assert not compat.has_causal_lm_class(_llava_config())


def test_model_from_config_builds_the_named_class_in_its_dtype():
    import transformers

    assert compat.can_build_from_config(transformers.LlavaForConditionalGeneration)
    assert not compat.can_build_from_config(None)
    assert not compat.can_build_from_config(json)
    with compat.no_init_weights():
        model = compat.model_from_config(
            transformers.LlavaForConditionalGeneration, _llava_config(), torch.bfloat16
        )
    assert type(model) is transformers.LlavaForConditionalGeneration
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_checkpoint_renaming_gives_the_saved_names():
    """A LLaVA's parameters under transformers 5 are ``model.language_model.*``; it saves them as
    ``language_model.model.*``, the same tensors."""
    import transformers

    model = transformers.LlavaForConditionalGeneration(_llava_config())
    own = dict(model.state_dict(keep_vars=True))
    renamed = compat.checkpoint_renaming(model, own)
    if int(transformers.__version__.split(".")[0]) < 5:
        assert renamed is None
        return
    assert renamed is not None
    assert any(n.startswith("language_model.model.layers.0.") for n in renamed)
    assert not any(n.startswith("model.language_model.") for n in renamed)
    assert {id(t) for t in renamed.values()} == {id(t) for t in own.values()}
    assert set(renamed) == _saved_names(model)  # what save_pretrained writes


def _saved_names(model) -> set[str]:
    import tempfile

    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
            return set(f.keys())


def test_compat_is_the_only_module_naming_these_private_apis():
    """The private names appear in evomerge's code only in compat.py (and the two overrides that
    must carry the name, marked with a comment pointing here)."""
    root = Path(compat.__file__).parent
    private = [
        "study._get_trials(",
        "super()._loglikelihood_tokens",
        "cache_hook.add_partial",
        "build_all_requests(",
        "lm_task.tqdm",
        "._model_mapping",
        '"_model_mapping"',
        "._from_config(",
        "import revert_weight_conversion",
        "initialization import no_init_weights",
        "modeling_utils import no_init_weights",
        "TRANSFORMERS_SDPA_FORCE_GQA",
        "._attn_implementation",
        '"_filters"',
        "._filters",
    ]
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "compat.py":
            continue
        text = path.read_text()
        found += [f"{path.relative_to(root)}: {p}" for p in private if p in text]
    assert not found, found
