"""The ``evomerge`` command line: parse, then call one library function per verb.

Every user mistake surfaces as :class:`~evomerge.errors.EvomergeError` and is printed as one line
(``evomerge: error: ...``) with exit code 2. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from evomerge.errors import EvomergeError, hide_password, one_line

if TYPE_CHECKING:
    from evomerge.search.loop import SearchOutcome

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line instead of argparse's usage block.
        self.exit(
            2, f"{self.prog}: error: {one_line(message)} (see {self.prog.split()[0]} --help)\n"
        )


def _integer(low: int, high: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], else argparse's one-line error."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return convert


_count = _integer(1, what="a positive integer")  # --threads, --workers, --trials, --top
_index = _integer(0, what="a non-negative integer")  # --trial
_seed = _integer(0, what="a non-negative integer")  # --seed of search and merge: hashed, any size
_torch_seed = _integer(0, 2**64 - 1, what="an integer in [0, 2**64)")  # moe, zoo: torch.manual_seed


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge models with a mergekit recipe",
        description="Merge models as a mergekit recipe says; write a Hugging Face model directory.",
    )
    p.add_argument("recipe", help="mergekit merge configuration (YAML)")
    p.add_argument("out", help="output directory (must be absent or empty unless --force)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument(
        "--out-shard-size",
        default="5GB",
        help="maximum shard size, e.g. 2GB or 500M (default: 5GB)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="seed of random masks (dare, della) (default: the recipe's `# evomerge-seed: N` comment, else 0)",
    )
    p.add_argument(
        "--stream",
        type=int,
        default=None,
        choices=(1, 2),
        help="random stream of masks: 2 (the default), or 1 (the stream of an export whose comment names none) "
        "(default: the recipe's `# evomerge-seed: N stream V` comment; a comment without a stream means 1; no comment: 2)",
    )
    p.add_argument(
        "--copy-tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy tokenizer files from the base model or tokenizer_source (default: on)",
    )
    p.add_argument(
        "--allow-crimes",
        action="store_true",
        help="merge models of different architectures when tensor shapes match",
    )
    p.add_argument(
        "--allow-bin",
        action="store_true",
        help="also read PyTorch .bin checkpoints (torch.load with weights_only=True)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def _add_moe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "moe",
        help="build a mixture of experts from a mergekit-moe config",
        description="Build a Mixtral-style mixture of experts as a mergekit-moe configuration says; write a Hugging Face model directory.",
    )
    p.add_argument(
        "config",
        help="mergekit-moe configuration (YAML): base_model, experts, gate_mode, experts_per_token, dtype",
    )
    p.add_argument("out", help="output directory (must be absent or empty unless --force)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the base model runs for gate_mode hidden: cpu or cuda[:N] (default: cpu)",
    )
    p.add_argument(
        "--seed",
        type=_torch_seed,
        default=0,
        help="seed of random routers (gate_mode random, uniform_random) and of noise_scale (default: 0)",
    )
    p.add_argument(
        "--out-shard-size",
        default="5GB",
        help="maximum shard size, e.g. 2GB or 500M (default: 5GB)",
    )
    p.add_argument(
        "--copy-tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="copy the base model's tokenizer files (default: on)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def _add_zoo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "zoo",
        help="set up the demo model zoo",
        description="Set up the demo zoo: a tiny base model, fine-tuned experts and local lm-eval tasks. "
        "The demo zoo of seed 0 ships with evomerge and is installed in seconds; other seeds, the micro size and --rebuild train it with torch.",
    )
    p.add_argument("--out", default=None, help="where to put it (default: results/zoo/<size>)")
    p.add_argument(
        "--size",
        default="demo",
        choices=["demo", "micro"],
        help="demo (default) or micro (for tests)",
    )
    p.add_argument(
        "--seed",
        type=_torch_seed,
        default=0,
        help="seed of the zoo's data and training (default: 0, the shipped zoo)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="train the zoo here instead of installing the shipped weights (demo: about 4 minutes on 2 cores; "
        "bit-identical to the shipped zoo only on a CPU like the one it was built on), replacing the directory",
    )


def _add_search(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search a merge space",
        description="Run (or resume) the Optuna study of a search space.",
    )
    p.add_argument("space", help="search space YAML (a mergekit recipe with search directives)")
    p.add_argument(
        "--trials",
        type=_count,
        default=None,
        help="total completed trials to reach (overrides search.trials)",
    )
    p.add_argument(
        "--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)"
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL, e.g. postgresql://user@host/db to share the study with workers on other hosts, "
        "or journal:///path/study.log (default: sqlite under results/<study>/)",
    )
    p.add_argument(
        "--study", default=None, help="study name (default: study.name or the space's file name)"
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="sampler and mask seed (overrides search.seed)",
    )
    p.add_argument(
        "--results-dir", default="results", help="where study folders go (default: results)"
    )
    p.add_argument(
        "--probe-contamination",
        action="store_true",
        help="also run the Min-K%%++ memorization probe on finalists",
    )
    p.add_argument(
        "--threads",
        type=_count,
        default=None,
        help="CPU threads for torch (default: 1 for the demo zoo's tiny models, else torch's default)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the final summary")
    p.add_argument(
        "--workers",
        type=_count,
        default=None,
        metavar="N",
        help="run N worker processes on this host on the study's storage: one per CUDA device, or N CPU workers with --device cpu",
    )
    p.add_argument(
        "--devices",
        default=None,
        metavar="LIST",
        help="one worker per listed CUDA device, e.g. 0,1,2,3",
    )
    p.add_argument(
        "--gpu-memory",
        default=None,
        metavar="SIZE",
        help="GPU memory the search may plan for, e.g. 60GB (default: the free memory); sources stay on the GPU when they fit "
        "beside the merged model and evaluation, else in pinned host memory, streamed each merge",
    )
    p.add_argument(
        "--as-worker", action="store_true", help=argparse.SUPPRESS
    )  # started by --workers: no leaderboard of its own


def _add_study_reader(
    sub: argparse._SubParsersAction, name: str, help_text: str
) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("space", help="the search space YAML the study was run from")
    p.add_argument(
        "--storage",
        default=None,
        help="the study's Optuna storage URL (default: the SQLite file under results/<study>/)",
    )
    p.add_argument(
        "--study", default=None, help="study name (default: study.name or the space's file name)"
    )
    p.add_argument(
        "--results-dir", default="results", help="where study folders are (default: results)"
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evomerge", description="Search merge recipes for fine-tuned LLMs.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    _add_search(sub)
    _add_merge(sub)
    _add_moe(sub)
    p = _add_study_reader(sub, "export", "export a trial's recipe as plain mergekit YAML")
    p.add_argument("-o", "--output", required=True, help="recipe file to write")
    p.add_argument(
        "--trial",
        type=_index,
        default=None,
        help="trial number (default: the chosen trial: best validation score among the re-scored trials, else best search score)",
    )
    p.add_argument(
        "--merge",
        default=None,
        metavar="OUT_DIR",
        help="also materialize the model (with a model card) into OUT_DIR",
    )
    p.add_argument("--device", default="cpu", help="device of the --merge, cpu or cuda[:N]")
    p.add_argument(
        "--force", action="store_true", help="overwrite the recipe file / replace OUT_DIR"
    )
    p = _add_study_reader(sub, "results", "print the leaderboard of a study")
    p.add_argument("--top", type=_count, default=15, help="rows to show (default 15)")
    p.add_argument("--all", action="store_true", help="show every trial, failed ones too")
    _add_study_reader(sub, "report", "write PNG plots of a study")
    _add_zoo(sub)
    return parser


def _version() -> str:
    from evomerge import __version__

    return f"evomerge {__version__}"


def _run(args: argparse.Namespace) -> int:
    from evomerge.schemes import register
    from evomerge.zoo.scheme import SCHEME

    register(SCHEME)  # also found through the entry point; explicit for uninstalled checkouts
    if args.verb == "merge":
        from evomerge.engine.merger import merge_to_disk
        from evomerge.engine.rng import pragma_from_text

        text = _read_text(args.recipe, "recipe")
        try:
            seed, stream = pragma_from_text(text)
        except ValueError as e:
            raise EvomergeError(f"{args.recipe}: {e}") from None
        if args.seed is None:
            args.seed = seed or 0
        if args.stream is None:
            args.stream = stream
        result = merge_to_disk(
            args.recipe,
            args.out,
            device=args.device,
            seed=args.seed,
            shard_size=args.out_shard_size,
            copy_tokenizer=args.copy_tokenizer,
            allow_crimes=args.allow_crimes,
            allow_bin=args.allow_bin,
            force=args.force,
            recipe_text=text,
            stream=args.stream,
        )
        print(
            f"merged {result.n_tensors} tensors into {args.out} in {result.seconds:.1f}s ({result.bytes_out / 1e6:.1f} MB); tensor hash {result.digest[:16]}"
        )
        return 0
    if args.verb == "moe":
        from evomerge.moe import moe_to_disk

        built = moe_to_disk(
            args.config,
            args.out,
            device=args.device,
            seed=args.seed,
            shard_size=args.out_shard_size,
            copy_tokenizer=args.copy_tokenizer,
            force=args.force,
            config_text=_read_text(args.config, "configuration"),
        )
        print(
            f"built a mixture of {built.n_tensors} tensors into {args.out} in {built.seconds:.1f}s ({built.bytes_out / 1e6:.1f} MB); tensor hash {built.digest[:16]}"
        )
        return 0
    if args.verb == "zoo":
        from evomerge.zoo import main_zoo

        return int(
            main_zoo(out=args.out, size=args.size, seed=args.seed, rebuild=args.rebuild) or 0
        )
    if args.verb == "search" and args.gpu_memory is not None:
        from evomerge.engine.placement import GPU_MEMORY_ENV, budget_override

        budget_override(args.gpu_memory)  # a bad size fails here, in one line
        os.environ[GPU_MEMORY_ENV] = str(args.gpu_memory)  # worker processes inherit it
    if args.verb == "search":
        from evomerge.results.leaderboard import leaderboard, summary
        from evomerge.search.loop import run_search
        from evomerge.search.table import load_trials

        if args.workers is not None or args.devices is not None:
            code, outcome = _search_workers(args)
            if outcome is None:
                return code
        else:
            outcome = run_search(
                args.space,
                trials=args.trials,
                device=args.device,
                storage=args.storage,
                study=args.study,
                seed=args.seed,
                results_dir=args.results_dir,
                probe=args.probe_contamination,
                quiet=args.quiet,
                threads=args.threads,
            )
            if args.as_worker:
                print(
                    f"worker done: study {outcome.paths.name} has {outcome.n_complete} complete trials"
                )
                return 0
        df = load_trials(outcome.paths.csv)
        print(leaderboard(df, top=10))
        print(summary(outcome, df))
        print(
            f"next: evomerge export {args.space} -o best.yml   (and: evomerge report {args.space})"
        )
        return 0
    if args.verb == "export":
        from evomerge.results.export import main_export

        return int(main_export(args) or 0)
    if args.verb == "results":
        from evomerge.results.leaderboard import main_results

        return main_results(
            args.space,
            study=args.study,
            storage=args.storage,
            results_dir=args.results_dir,
            top=args.top,
            show_all=args.all,
        )
    if args.verb == "report":
        from evomerge.results.report import main_report

        return int(main_report(args) or 0)
    raise AssertionError(args.verb)  # pragma: no cover - argparse restricts verbs


def _read_text(path: str, what: str) -> str:
    """A YAML file's text, or one line saying why it cannot be read."""
    try:
        return open(path, encoding="utf-8").read()
    except OSError as e:
        raise EvomergeError(f"{path}: cannot read {what}: {one_line(e.strerror or e)}") from None
    except UnicodeDecodeError:
        raise EvomergeError(
            f"{path}: cannot read {what}: not UTF-8 text; expected a mergekit YAML {what}"
        ) from None


def _search_workers(args: argparse.Namespace) -> tuple[int, SearchOutcome | None]:
    """``evomerge search --workers N``: one worker process per device. Returns the exit code and
    the study's outcome read from the storage (None when a worker failed, or after Ctrl-C)."""
    import time

    from evomerge.search.distributed.workers import run_workers, worker_devices
    from evomerge.search.loop import SearchOutcome
    from evomerge.search.storage import load_study, locate
    from evomerge.search.table import write_trials_csv

    devices = worker_devices(args.workers, args.devices, args.device)
    paths = locate(
        args.space, study=args.study, storage=args.storage, results_dir=args.results_dir
    )  # a bad space: one line, no worker
    argv = ["search", args.space, "--results-dir", args.results_dir]
    for flag, value in (
        ("--trials", args.trials),
        ("--storage", args.storage),
        ("--study", args.study),
        ("--seed", args.seed),
        ("--threads", args.threads),
    ):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--probe-contamination"] * args.probe_contamination + ["--quiet"] * args.quiet
    where = "CPU" if devices[0] is None else "CUDA device(s) " + ",".join(str(d) for d in devices)
    print(
        f"evomerge: {len(devices)} workers on {where}, study {paths.name} in {hide_password(paths.storage)}",
        flush=True,
    )
    start = time.perf_counter()
    code = run_workers(argv, devices)
    if code:
        return code, None
    df = write_trials_csv(load_study(paths), paths.csv)
    return 0, SearchOutcome.from_table(paths, df, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``evomerge`` console script; returns the exit code."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad flag (argparse printed its one line)
        return e.code if isinstance(e.code, int) else 2

    def fail(line: str) -> int:
        # Every error line hides passwords: of URLs in it, and of the --storage URL wherever a
        # library quotes it.
        print(
            f"evomerge: error: {hide_password(line, getattr(args, 'storage', None))}",
            file=sys.stderr,
        )
        return 2

    try:
        code = _run(args)
        sys.stdout.flush()  # a closed pipe fails here, inside the handlers below
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except EvomergeError as e:
        return fail(one_line(e))
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        reason = _file_failure(e)
        if reason is None:
            raise
        return fail(reason)
    except Exception as e:
        reason = _storage_failure(e)
        if reason is None:
            raise
        return fail(reason)


def _closed_pipe() -> int:
    """``evomerge results ... | head -1``: the reader has gone. Exit quietly, as a Unix tool killed
    by SIGPIPE does, and point stdout at /dev/null so that Python's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
        pass
    return 128 + signal.SIGPIPE


# Failures of the file system, not of evomerge: a folder that is read-only or not ours, a full disk.
_FILE_ERRNOS = {
    errno.EACCES: "check the folder's permissions, or choose another folder",
    errno.EPERM: "check the folder's permissions, or choose another folder",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOSPC: "free some space, or choose another disk",
    errno.EDQUOT: "free some space, or choose another disk",
    errno.ENOTDIR: "a file stands where a folder should be",
    errno.EISDIR: "a folder stands where a file should be",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def _file_failure(e: OSError) -> str | None:
    """One line for a path that the file system refuses (None for other OSErrors: bugs keep
    their traceback)."""
    hint = _FILE_ERRNOS.get(e.errno) if e.errno is not None else None
    if hint is None or e.filename is None:
        return None
    return f"{e.filename}: {e.strerror} ({hint})"


def _storage_failure(e: BaseException) -> str | None:
    """One line for a study storage that failed mid-run (a database locked by another program for
    longer than the 60 s timeout, a server that went away); None for any other exception."""
    kinds: list[type[BaseException]] = []
    if "optuna" in sys.modules:
        from optuna.exceptions import StorageInternalError

        kinds.append(StorageInternalError)
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.exc import SQLAlchemyError

        kinds.append(SQLAlchemyError)
    if not kinds or not isinstance(e, tuple(kinds)):
        return None
    cause = e.__cause__ or e
    reason = hide_password(one_line(getattr(cause, "orig", None) or cause))[:200]
    return (
        f"the study's storage failed: {type(cause).__name__}: {reason} "
        "(is the database locked by another program, or unreachable? running the same command again resumes the study)"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
