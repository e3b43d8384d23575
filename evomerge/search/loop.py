"""``evomerge search``: ask -> materialize in memory -> evaluate -> tell, until the budget is met.

One process, one set of opened sources, one resident model per output layout: every trial
writes its merged tensors into that model in place and lm-eval scores the model object
directly (task objects built once). Every trial, failed ones included, is recorded in the
Optuna storage; ``results/<study>/trials.csv`` is rewritten after each one.

Resume: running the same command again continues the study until ``trials`` trials have
completed in total. A trial left RUNNING by a process that died (``kill -9``, power loss) is
marked failed on resume and its parameters are retried once. Ctrl-C marks the current trial
failed ("interrupted"), writes the table and exits with 130.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from evomerge.engine.merger import Merger
from evomerge.engine.sources import open_sources
from evomerge.errors import ConfigError, EvomergeError, one_line
from evomerge.io import dump_yaml
from evomerge.recipe.schema import parse_recipe
from evomerge.search.table import (
    StudyPaths,
    best_row,
    leaderboard,
    open_storage,
    study_paths,
    write_trials_csv,
)
from evomerge.space.space import Directive, Space, load_space

__all__ = ["Search", "SearchOutcome", "run_search", "main_search", "make_sampler"]

_HOST = socket.gethostname()


@dataclass
class SearchOutcome:
    """What a finished (or resumed-to-completion) search reports."""

    paths: StudyPaths
    n_complete: int
    n_failed: int
    best: Mapping[str, Any] | None
    baselines: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def make_sampler(name: str, seed: int, n_trials: int, startup: int | None = None, multi: bool = False) -> Any:
    """The Optuna sampler for ``search.sampler``, seeded."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if startup is None:
        startup = max(4, min(10, n_trials // 4))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, group=True, constant_liar=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=min(startup, 5), warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, n_trials // 4)))
    raise ValueError(name)  # pragma: no cover - validated in space.py


def _suggest(trial: Any) -> Callable[[str, Directive], Any]:
    def suggest(name: str, d: Directive) -> Any:
        if d.kind == "choice":
            return trial.suggest_categorical(name, list(d.choices))
        if d.kind == "int":
            return trial.suggest_int(name, int(d.low), int(d.high), step=int(d.step or 1))
        return trial.suggest_float(name, d.low, d.high, log=d.log, step=d.step)

    return suggest


def _default_threads(device: str, space: Space) -> int | None:
    """One CPU thread for tiny models (such as the demo zoo): their matrices are too small for
    intra-op threads to pay, and on a busy machine two threads were measured 4-50x slower than
    one. Larger models keep torch's default."""
    if not device.startswith("cpu"):
        return None
    refs = [r for r in space.model_refs() if isinstance(r, str)]
    if refs and all(r.startswith("zoo:") for r in refs):
        return 1
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Search:
    """A prepared search: space validated, sources opened, evaluator built, storage open.

    Args:
        space_file: the search space YAML.
        trials, device, storage, study, seed, results_dir: overrides of the space's settings.
        evaluator: an :class:`evomerge.evaluation.section.Evaluator` to use instead of lm-eval (tests).
        probe: run the Min-K%++ memorization probe on finalists.
        quiet: no progress bar.

    Raises:
        ConfigError / EvomergeError: anything wrong with the space, its models, its tasks or the
            storage (checked before anything is written).
    """

    def __init__(self, space_file: str | Path, *, trials: int | None = None, device: str | None = None, storage: str | None = None,
                 study: str | None = None, seed: int | None = None, results_dir: str | Path = "results", evaluator: Any = None,
                 probe: bool = False, quiet: bool = False, log: Callable[[str], None] | None = None, threads: int | None = None) -> None:
        self.space: Space = load_space(space_file)
        self.file = str(space_file)
        s = self.space.search
        if trials is not None and trials <= 0:
            raise EvomergeError(f"--trials: must be a positive integer, got {trials}")
        self.trials = trials or s.trials
        self.seed = s.seed if seed is None else seed
        self.quiet = quiet
        self.probe = probe
        self.log = log or (lambda msg: print(msg, flush=True))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EvomergeError("--device cuda: no CUDA device is available (torch.cuda.is_available() is false)")
        self.device = device
        threads = threads if threads is not None else _default_threads(device, self.space)
        if threads:
            torch.set_num_threads(threads)
        self.paths = study_paths(space_file, study=study, space_study=self.space.study_name, storage=storage,
                                 space_storage=self.space.storage, results_dir=results_dir)
        # Models: open once; a space whose models cannot merge fails here, before any output.
        refs = self.space.model_refs()
        self.sources = open_sources(refs, file=self.file)
        self.merger = Merger(self.sources, device=device, seed=self.seed, resident=True)
        self._models: dict[str, torch.nn.Module] = {}
        self.tokenizer_dir = self._tokenizer_dir()
        self.baseline_recipes = self._baseline_recipes()
        for name, recipe in self.baseline_recipes.items():
            if name == "uniform" or name.startswith("hand:"):
                self.merger.plan(parse_recipe(recipe, f"{self.file} (baseline {name})"))
        # Evaluation: tasks, prompts and datasets built once for the whole study.
        if evaluator is None:
            from transformers import AutoTokenizer

            from evomerge.evaluation.lmeval import LMEvalEvaluator
            from evomerge.evaluation.section import parse_evaluate

            cfg = parse_evaluate(self.space.evaluate, self.file, self.space.base_dir)
            tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
            evaluator = LMEvalEvaluator(cfg, tokenizer, device=device)
        self.evaluator = evaluator
        self.search_tasks = list(evaluator.task_names("search"))
        self.holdout_tasks = list(evaluator.task_names("holdout"))
        objectives = list(s.objectives)
        if objectives == ["tasks"]:
            objectives = self.search_tasks
        for o in objectives:
            if o not in self.search_tasks:
                raise ConfigError(self.file, "search.objectives", f"{o!r} is not a search task (tasks: {', '.join(self.search_tasks)})")
        self.objectives = objectives
        self.assessment = self._assess()
        # Storage last: a bad URL is reported before anything is written; the folder is created
        # only now that every check has passed.
        if self.paths.default_storage:
            self.paths.folder.mkdir(parents=True, exist_ok=True)
        self.storage = open_storage(self.paths.storage, field="--storage" if storage else "study.storage")

    # ------------------------------------------------------------------ setup helpers
    def _tokenizer_dir(self) -> Path:
        tree = self.space.tree
        ref = tree.get("tokenizer_source") if isinstance(tree.get("tokenizer_source"), str) else None
        if ref in (None, "base"):
            ref = self.space.model_refs()[0]
        return self.sources[ref].path if ref in self.sources else open_sources([ref], file=self.file)[ref].path

    def layers_of(self, ref: str) -> int:
        if ref not in self.sources:
            self.sources.update(open_sources([ref], file=self.file))
        return self.sources[ref].arch.num_layers

    def _dtype(self) -> str | None:
        d = self.space.tree.get("dtype")
        return d if isinstance(d, str) else None

    def _baseline_recipes(self) -> dict[str, dict[str, Any]]:
        """Each source alone, the uniform average of the fine-tunes, and the space's hand recipes."""
        refs = self.space.model_refs()
        base = self.space.tree.get("base_model") if isinstance(self.space.tree.get("base_model"), str) else None
        out: dict[str, dict[str, Any]] = {}
        extra = {"dtype": self._dtype()} if self._dtype() else {}
        for ref in refs:
            out[f"source:{ref}"] = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}], **extra}
        tuned = [r for r in refs if r != base]
        if len(tuned) < 2:
            tuned = refs
        if len(tuned) >= 2:
            out["uniform"] = {"merge_method": "linear", "models": [{"model": r, "parameters": {"weight": 1.0}} for r in tuned], **extra}
        for name, recipe in self.space.search.baselines:
            out[f"hand:{name}"] = dict(recipe)
        return out

    def _assess(self) -> Any:
        from evomerge.contamination import flags

        include = getattr(getattr(self.evaluator, "cfg", None), "include_path", None)
        # Reuse the evaluator's lm-eval task index (building one reads ~15k YAML files); an
        # evaluator without lm-eval tasks (tests, custom scorers) has no datasets to look up.
        tm = getattr(self.evaluator, "task_manager", None)
        if tm is None and include is None:
            tm = SimpleNamespace(task_index={})
        try:
            return flags.assess(self.space.model_refs(), self.search_tasks, self.holdout_tasks, include_path=include, task_manager=tm)
        except EvomergeError:
            raise
        except Exception as e:  # flags are evidence, never a reason to refuse a search
            self.log(f"warning: contamination checks failed: {one_line(e)}")
            return None

    # ------------------------------------------------------------------ materialize + score
    def model_for(self, plan: Any) -> torch.nn.Module:
        """The resident model for the plan's output layout (built once per layout)."""
        key = json.dumps(plan.out_config, sort_keys=True, default=str) + plan.out_dtype
        model = self._models.get(key)
        if model is None:
            if len(self._models) >= 2:  # frankenmerge searches change layouts: keep memory bounded
                self._models.clear()
            model = self.merger.build_model(plan)
            self._models[key] = model
        return model

    def materialize(self, recipe: Mapping[str, Any], where: str) -> tuple[torch.nn.Module, Any]:
        """Merge ``recipe`` into its resident model; returns the model and the merge result."""
        cfg = parse_recipe(dict(recipe), where)
        plan = self.merger.plan(cfg)
        model = self.model_for(plan)
        result = self.merger.merge_into(model, plan)
        return model, result

    def evaluate(self, model: torch.nn.Module, split: str) -> dict[str, Any]:
        r = self.evaluator.evaluate(model, split)
        bad = [t for t, v in r.scores.items() if v is None or (isinstance(v, float) and math.isnan(v))]
        if bad:
            raise EvomergeError(f"evaluation gave no score for {', '.join(bad)}")
        return {"scores": dict(r.scores), "stderr": {k: float(v) for k, v in r.stderr.items()}, "aggregate": float(r.aggregate),
                "aggregate_se": float(r.aggregate_se), "seconds": float(r.seconds)}

    # ------------------------------------------------------------------ the study
    def open_study(self) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = make_sampler(self.space.search.sampler, self.seed, self.trials, self.space.search.startup_trials, bool(self.objectives))
        kw: dict[str, Any] = {"directions": ["maximize"] * len(self.objectives)} if self.objectives else {"direction": "maximize"}
        study = optuna.create_study(study_name=self.paths.name, storage=self.storage, sampler=sampler, load_if_exists=True, **kw)
        fingerprint = json.dumps({"tree": _jsonable(self.space.tree), "objectives": self.objectives}, sort_keys=True, default=str)
        old = study.user_attrs.get("space")
        if old is not None and old != fingerprint:
            self.log(f"warning: the space changed since study {self.paths.name!r} started; earlier trials keep their recipes (use --study NEW to start afresh)")
        study.set_user_attr("space", fingerprint)
        study.set_user_attr("space_file", str(Path(self.file).resolve()))
        study.set_user_attr("seed", self.seed)
        study.set_user_attr("model_refs", self.space.model_refs())
        include = getattr(getattr(self.evaluator, "cfg", None), "include_path", None)
        study.set_user_attr("include_path", list(include) if include else None)
        study.set_user_attr("search_tasks", self.search_tasks)
        study.set_user_attr("holdout_tasks", self.holdout_tasks)
        if self.assessment is not None:
            from evomerge.contamination.flags import assessment_to_dict

            study.set_user_attr("flags", self.assessment.columns())
            study.set_user_attr("assessment", assessment_to_dict(self.assessment))
        return study

    def recover(self, study: Any) -> list[int]:
        """Fail trials whose process died and queue their parameters for one retry."""
        from optuna.trial import TrialState

        dead = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            proc = t.user_attrs.get("proc") or {}
            pid, host = proc.get("pid"), proc.get("host")
            if host != _HOST or pid is None or (pid != os.getpid() and _pid_alive(int(pid))):
                continue
            result = {**(t.user_attrs.get("result") or {}), "error": f"process {pid} died while this trial was running"}
            study._storage.set_trial_user_attr(t._trial_id, "result", result)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            dead.append(t.number)
            if t.user_attrs.get("retry_of") is None and t.params:
                study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
        return dead

    def run_baselines(self, study: Any) -> None:
        for name, recipe in self.baseline_recipes.items():
            self._check_interrupt()
            key = f"baseline:{name}"
            if key in study.user_attrs or f"enqueued:{name}" in study.user_attrs:
                continue
            if name.startswith("hand:"):
                values = self.space.values_of(recipe, self.layers_of)
                if values is not None:
                    # A point of the space: run it as a searched trial, so the sampler learns from it.
                    study.enqueue_trial(values, user_attrs={"baseline": name})
                    study.set_user_attr(f"enqueued:{name}", True)
                    self.log(f"baseline {name}: a point of the space, queued as the first trial")
                    continue
            rec: dict[str, Any] = {"method": recipe.get("merge_method"), "recipe": dump_yaml(recipe)}
            try:
                t0 = time.perf_counter()
                model, res = self.materialize(recipe, f"{self.file} (baseline {name})")
                rec.update(merge_s=time.perf_counter() - t0, digest=res.digest)
                rec["search"] = self.evaluate(model, "search")
                rec["eval_s"] = rec["search"]["seconds"]
                if self.holdout_tasks:
                    rec["holdout"] = self.evaluate(model, "holdout")
                rec["state"] = "COMPLETE"
                self.log(f"baseline {name:<28} search {rec['search']['aggregate']:.3f}" + (f"  holdout {rec['holdout']['aggregate']:.3f}" if "holdout" in rec else ""))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a baseline that cannot be merged/scored is reported, not fatal
                rec.update(state="FAIL", error=one_line(e)[:500])
                self.log(f"baseline {name}: failed: {rec['error']}")
            study.set_user_attr(key, rec)

    def holdout(self, study: Any, number: int, model: torch.nn.Module) -> dict[str, Any] | None:
        key = f"holdout:{number}"
        if not self.holdout_tasks or key in study.user_attrs:
            return study.user_attrs.get(key)
        h = self.evaluate(model, "holdout")
        study.set_user_attr(key, h)
        if self.probe:
            self._probe(study, number, model)
        return h

    def _probe(self, study: Any, number: int, model: torch.nn.Module) -> None:
        from evomerge.contamination.probe import probe_contamination

        base = self.space.tree.get("base_model")
        if not isinstance(base, str):
            study.set_user_attr(f"probe:{number}", {"memorization_probe": False, "memorization_probe_evidence": "not run: the space has no base_model"})
            return
        if getattr(self, "_base_model", None) is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self._base_model = AutoModelForCausalLM.from_pretrained(str(self.sources[base].path)).to(self.device).eval()
            self._probe_tok = AutoTokenizer.from_pretrained(str(self.tokenizer_dir))
        texts = [x for v in self.evaluator.texts("search").values() for x in v]
        # Unseen items of the same distribution are the best controls (perturbed neighbours can
        # over-flag a merge that merely learned the skill): use the holdout items when there are.
        controls = [x for v in self.evaluator.texts("holdout").values() for x in v] if self.holdout_tasks else []
        r = probe_contamination(model, self._base_model, self._probe_tok, texts, controls=controls or None, seed=self.seed)
        study.set_user_attr(f"probe:{number}", r.columns())

    def run_trial(self, study: Any, best: list[float]) -> tuple[str, Any]:
        """One ask/materialize/evaluate/tell round. Returns (state, trial)."""
        from optuna.trial import TrialState

        trial = study.ask()
        trial.set_user_attr("proc", {"pid": os.getpid(), "host": _HOST})
        info: dict[str, Any] = {}
        try:
            recipe = self.space.render(_suggest(trial), self.layers_of)
            info.update(method=recipe.get("merge_method"), recipe=dump_yaml(recipe))
            t0 = time.perf_counter()
            model, res = self.materialize(recipe, f"{self.file} (trial {trial.number})")
            info.update(merge_s=time.perf_counter() - t0, digest=res.digest)
            ev = self.evaluate(model, "search")
            info.update(search=ev, eval_s=ev["seconds"])
        except KeyboardInterrupt:
            trial.set_user_attr("result", {**info, "error": "interrupted (Ctrl-C)"})
            study.tell(trial, state=TrialState.FAIL)
            raise
        except (EvomergeError, RuntimeError, ValueError, KeyError, torch.cuda.OutOfMemoryError) as e:
            msg = one_line(e if isinstance(e, EvomergeError) else f"{type(e).__name__}: {e}")[:500]
            trial.set_user_attr("result", {**info, "error": msg})
            study.tell(trial, state=TrialState.FAIL)
            return "FAIL", trial
        # One write for everything the table needs (each storage write is a database commit).
        trial.set_user_attr("result", info)
        values = [ev["scores"][o] for o in self.objectives] if self.objectives else ev["aggregate"]
        study.tell(trial, values)
        if ev["aggregate"] > best[0] or trial.user_attrs.get("baseline"):
            best[0] = max(best[0], ev["aggregate"])
            self.holdout(study, trial.number, model)  # every new best (and hand recipe) gets its holdout re-score now
        return "COMPLETE", trial

    def finalists(self, study: Any) -> None:
        """Re-score the top ``finalists`` trials by search score on the holdout items."""
        from optuna.trial import TrialState

        n = self.space.search.finalists
        if not n or not self.holdout_tasks:
            return
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "search" in (t.user_attrs.get("result") or {})]
        done.sort(key=lambda t: t.user_attrs["result"]["search"]["aggregate"], reverse=True)
        for t in done[:n]:
            self._check_interrupt()
            if f"holdout:{t.number}" in study.user_attrs:
                continue
            info = t.user_attrs["result"]
            recipe = parse_recipe_yaml(info["recipe"])  # the exact recipe the trial merged
            model, res = self.materialize(recipe, f"{self.file} (trial {t.number})")
            if res.digest != info.get("digest"):
                self.log(f"warning: trial {t.number} re-merged to a different tensor hash ({res.digest[:12]} vs {str(info.get('digest'))[:12]})")
            self.holdout(study, t.number, model)

    def run(self) -> SearchOutcome:
        """Run or resume the study to its budget; returns the outcome.

        Raises:
            KeyboardInterrupt: on Ctrl-C, after marking the running trial failed and writing the table.
        """
        # Remember Ctrl-C even if a library on the stack swallows the KeyboardInterrupt (a
        # database driver in the middle of a commit may): the loop re-raises it at the next step.
        self._interrupted = False
        restore = None
        if threading.current_thread() is threading.main_thread():
            restore = signal.getsignal(signal.SIGINT)

            def on_sigint(signum: int, frame: Any) -> None:
                self._interrupted = True
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)
        try:
            return self._run()
        finally:
            if restore is not None:
                signal.signal(signal.SIGINT, restore)

    def _check_interrupt(self) -> None:
        if getattr(self, "_interrupted", False):
            raise KeyboardInterrupt

    def _run(self) -> SearchOutcome:
        from optuna.trial import TrialState

        start = time.perf_counter()
        if self.assessment is not None:
            for w in self.assessment.warnings():
                self.log(w)
        study = self.open_study()
        dead = self.recover(study)
        if dead:
            self.log(f"resume: trial(s) {', '.join(map(str, dead))} were running when their process died: marked failed, parameters queued for one retry")
        try:
            self.run_baselines(study)
            write_trials_csv(study, self.paths.csv)
            complete = lambda: len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))  # noqa: E731
            n_done = complete()
            if n_done:
                self.log(f"resume: {n_done} of {self.trials} trials already complete")
            best = [max([(t.user_attrs.get("result") or {}).get("search", {}).get("aggregate", -math.inf) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))], default=-math.inf)]
            attempts = 0
            bar = None
            if not self.quiet and n_done < self.trials:
                from tqdm.auto import tqdm

                bar = tqdm(total=self.trials, initial=n_done, desc="trials", unit="trial", dynamic_ncols=True, file=sys.stderr)
            while n_done < self.trials and attempts < 3 * self.trials + 10:
                self._check_interrupt()
                attempts += 1
                state, trial = self.run_trial(study, best)
                write_trials_csv(study, self.paths.csv)
                self._check_interrupt()
                ua = study._storage.get_trial(trial._trial_id).user_attrs.get("result") or {}
                line = f"trial {trial.number:>3} {state:8}"
                if state == "COMPLETE":
                    n_done += 1
                    line += f" score {ua['search']['aggregate']:.3f}  merge {ua['merge_s']:.2f}s eval {ua['eval_s']:.2f}s  {ua.get('method', '')}"
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(best=f"{best[0]:.3f}")
                else:
                    line += f" {ua.get('error', '')}"
                if not self.quiet:
                    (bar.write if bar is not None else self.log)(line)
            if bar is not None:
                bar.close()
            if n_done < self.trials:
                self.log(f"stopped after {attempts} attempts with {n_done} complete trials: too many failures (see the error column)")
            self.finalists(study)
        except KeyboardInterrupt:
            write_trials_csv(study, self.paths.csv)
            raise
        df = write_trials_csv(study, self.paths.csv)
        best_r = best_row(df)
        baselines = {r["baseline"]: r for r in df[df["baseline"] != ""].to_dict("records")}
        n_fail = int((df["state"] == "FAIL").sum())
        return SearchOutcome(self.paths, n_done, n_fail, None if best_r is None else best_r.to_dict(), baselines, time.perf_counter() - start)


def parse_recipe_yaml(text: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(text)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Directive):
        return {"directive": x.kind, "name": x.name, "low": x.low, "high": x.high, "log": x.log, "step": x.step,
                "choices": list(x.choices), "anchors": x.anchors, "per_layers": x.per_layers}
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def run_search(space_file: str | Path, **kwargs: Any) -> SearchOutcome:
    """Run (or resume) the search of a space; see :class:`Search` for the arguments.

    Example:
        >>> out = run_search("search_spaces/demo.yml", trials=40)   # doctest: +SKIP
        >>> out.best["holdout"]                                      # doctest: +SKIP
    """
    return Search(space_file, **kwargs).run()


def summary(outcome: SearchOutcome) -> str:
    """The end-of-run comparison: best trial vs every source model and the uniform merge."""
    lines = [f"study {outcome.paths.name}: {outcome.n_complete} complete trials, {outcome.n_failed} failed, {outcome.seconds:.0f}s; table: {outcome.paths.csv}"]
    best = outcome.best
    if best is None:
        return "\n".join(lines + ["no completed trial"])
    use_h = best.get("holdout") is not None and not (isinstance(best.get("holdout"), float) and math.isnan(best["holdout"]))
    key = "holdout" if use_h else "score"
    bval = float(best[key])
    lines.append(f"best trial #{best['number']} ({best.get('method', '')}): search {float(best['score']):.3f}" + (f", holdout {bval:.3f}" if use_h else ""))
    beaten_all = True
    for name, b in outcome.baselines.items():
        if b.get("state") != "COMPLETE":
            lines.append(f"  vs {name:<32} (failed: {b.get('error', '')})")
            continue
        r = b.get(key)
        if r is None or (isinstance(r, float) and math.isnan(r)):
            lines.append(f"  vs {name:<32} ({key} not measured)")
            continue
        diff = bval - float(r)
        beaten_all &= diff > 0 or b.get("number") == best.get("number")
        lines.append(f"  vs {name:<32} {key} {float(r):.3f}  ({'+' if diff >= 0 else ''}{diff:.3f})")
    lines.append(f"the best trial's {key} score {'beats' if beaten_all else 'does NOT beat'} every source model and the uniform merge")
    return "\n".join(lines)


def main_search(args: Any) -> int:
    """``evomerge search space.yml``."""
    search = Search(args.space, trials=args.trials, device=args.device, storage=args.storage, study=args.study, seed=args.seed,
                    results_dir=args.results_dir, probe=args.probe_contamination, quiet=args.quiet, threads=args.threads)
    outcome = search.run()
    from evomerge.search.table import load_trials

    print(leaderboard(load_trials(outcome.paths.csv), top=10))
    print(summary(outcome))
    print(f"next: evomerge export {args.space} -o best.yml   (and: evomerge report {args.space})")
    return 0
