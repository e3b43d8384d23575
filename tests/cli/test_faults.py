"""Bad input and faults end in one line with exit code 2, write nowhere they should not, and leave
every file as it was when a command refuses: names that leave their folder, file modes, passwords,
counts, closed pipes, unwritable outputs, non-text and huge space files, silent acceptances."""

from __future__ import annotations

import gc
import hashlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _fake_eval import TaskVectorEvaluator
from _spaces import write_space

from evomerge.cli import main
from evomerge.errors import ConfigError, EvomergeError, hide_password
from evomerge.io import atomic_file, atomic_text, plain_name
from evomerge.search.setup import prepare
from evomerge.search.storage import study_paths
from evomerge.space import load_space, parse_space


def _one_line_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge") and "error: " in err, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its bytes' hash (folders: their mode). SQLite's ``-wal`` and
    ``-shm`` files belong to open connections, so they are collected (closed) first."""
    gc.collect()
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink() or not p.is_dir():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "?"
        else:
            out[rel] = oct(p.stat().st_mode)
    return out


class _FailingEvaluator(TaskVectorEvaluator):
    def evaluate(self, model, split="search", **kw):
        raise RuntimeError("this evaluator fails every candidate")


def _searched(root: Path, tiny_family, evaluator: type, **search) -> tuple[Path, Path]:
    """Run a study of the tiny family in ``root``: (space file, results folder)."""
    from evomerge.search.loop import run_search

    base, fts = tiny_family
    space = write_space(root / "space.yml", base, fts, **search)
    run_search(
        space,
        evaluator=evaluator(base, fts),
        results_dir=root / "results",
        quiet=True,
        log=lambda m: None,
    )
    return space, root / "results"


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_family):
    """A finished two-trial study of the tiny family: (root, space file, results folder). Tests
    that use it run a search: they are marked slow."""
    root = tmp_path_factory.mktemp("study")
    return (root, *_searched(root, tiny_family, TaskVectorEvaluator, trials=2, finalists=1))


# ---------------------------------------------------------------- names that leave their folder


@pytest.mark.parametrize(
    "name", ["../x", "../../x", "/tmp/x", "a/b", "a\\b", ".", "..", ".hidden", "-x", "", "x" * 129]
)
def test_a_study_name_that_leaves_its_folder_is_refused_wherever_it_comes_from(
    tmp_path, tiny_family, capsys, name
):
    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts)
    results = tmp_path / "r"
    before = _tree(tmp_path.parent)
    for verb in (["search"], ["results"], ["report"], ["export", "-o", str(tmp_path / "x.yml")]):
        err = _one_line_error(
            capsys, verb[0], str(space), *verb[1:], f"--study={name}", "--results-dir", str(results)
        )
        assert "--study" in err and "plain name" in err
    # the same name in the space file, in both forms of the study: section
    for section in ({"name": name}, name):
        data = yaml.safe_load(space.read_text())
        data["study"] = section
        space.write_text(yaml.safe_dump(data))
        err = _one_line_error(capsys, "results", str(space), "--results-dir", str(results))
        assert str(space) in err and "study" in err and "plain name" in err
        with pytest.raises(ConfigError, match="plain name"):
            load_space(space)
    after = _tree(tmp_path.parent)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= {f"{tmp_path.name}/space.yml"}, changed  # nothing written anywhere else


def test_study_paths_refuses_names_from_every_source_and_keeps_plain_ones(tmp_path):
    with pytest.raises(ConfigError, match="--study"):
        study_paths("s.yml", study="../up", results_dir=tmp_path)
    with pytest.raises(ConfigError, match="s.yml: study.name"):
        study_paths("s.yml", space_study="/etc/x", results_dir=tmp_path)
    # A name made from the space's file name is made plain: it never leaves results_dir.
    for file, name in (
        ("...yml", "space"),
        (".hidden.yml", "hidden"),
        ("my space.yml", "my_space"),
    ):
        paths = study_paths(tmp_path / file, results_dir=tmp_path / "r")
        assert paths.name == name and paths.folder.parent == tmp_path / "r"
    paths = study_paths("s.yml", study="demo-2.v1", results_dir=tmp_path)
    assert paths.folder == tmp_path / "demo-2.v1"
    assert paths.storage == f"sqlite:///{(tmp_path / 'demo-2.v1' / 'study.db').resolve()}"
    assert plain_name("Ünïcode_1", None, "--study") == "Ünïcode_1"
    with pytest.raises(ConfigError, match="--study"):
        plain_name("a?mode=ro", None, "--study")  # would be read as a URL query


# ---------------------------------------------------------------- modes of written files


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_files_written_through_a_temp_file_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        a = atomic_text(tmp_path / "sub" / "a.yml", "a: 1\n")
        b = atomic_file(tmp_path / "b.csv", lambda f: f.write("x\n"), mode="w")
        plain = tmp_path / "plain.txt"
        plain.write_text("as open() makes it\n")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE(plain.stat().st_mode) == want
    assert stat.S_IMODE(a.stat().st_mode) == want
    assert stat.S_IMODE(b.stat().st_mode) == want
    assert a.read_text() == "a: 1\n" and b.read_text() == "x\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.yml", "b.csv", "plain.txt", "sub"]


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "trials.csv"
    path.write_text("old\n")
    path.chmod(0o640)
    atomic_text(path, "new\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "new\n"


@pytest.mark.slow
def test_a_study_s_outputs_follow_the_umask(study, tmp_path, capsys):
    root, space, results = study
    old = os.umask(0o027)
    try:
        assert main(["report", str(space), "--results-dir", str(results)]) == 0
        out, model = tmp_path / "best.yml", tmp_path / "model"
        argv = ["export", str(space), "--results-dir", str(results), "-o", str(out)]
        assert main([*argv, "--merge", str(model)]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    written = [out, *(results / "space" / "report").iterdir(), *model.iterdir()]
    assert {"README.md", "config.json", "tokenizer_config.json", "model.safetensors"} <= {
        p.name for p in written
    }
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    assert stat.S_IMODE(model.stat().st_mode) == 0o750
    # trials.csv was written by the search under the test's umask, like the database beside it
    db, csv = results / "space" / "study.db", results / "space" / "trials.csv"
    assert stat.S_IMODE(csv.stat().st_mode) == stat.S_IMODE(db.stat().st_mode)


def test_a_merged_model_s_copied_files_do_not_keep_a_read_only_mode(tmp_path, tiny_family):
    import shutil

    from evomerge.engine.merger import merge_to_disk

    base, fts = tiny_family
    src = tmp_path / "src"
    shutil.copytree(fts[0], src)
    (src / "tokenizer_config.json").chmod(0o444)  # a shared, read-only cache
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(src), "parameters": {"weight": 1.0}}],
    }
    recipe["chat_template"] = "{{ messages }}"  # rewrites the copied tokenizer_config.json
    old = os.umask(0o022)
    try:
        merge_to_disk(recipe, tmp_path / "out")
    finally:
        os.umask(old)
    copied = tmp_path / "out" / "tokenizer_config.json"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o644
    assert "chat_template" in copied.read_text()


# ---------------------------------------------------------------- passwords


def test_hide_password_masks_userinfo_query_and_quoted_forms():
    url = "postgresql+psycopg://ann:p%40ss%2Fw0rd@db.example:5432/evo?sslmode=require"
    assert hide_password(url) == "postgresql+psycopg://ann:***@db.example:5432/evo?sslmode=require"
    said = f"cannot open {url}: FATAL: password p@ss/w0rd rejected for ann"
    assert "p@ss/w0rd" not in hide_password(said, url) and "p%40ss" not in hide_password(said, url)
    q = "postgresql://db/evo?user=ann&password=hunter2&x=1"
    assert hide_password(q) == "postgresql://db/evo?user=ann&password=***&x=1"
    for plain in ("sqlite:////tmp/a@b/study.db", "journal:///x.log", "postgresql://ann@db/evo"):
        assert hide_password(plain) == plain


_URLS = [
    "postgresql://evo:secret@127.0.0.1:1/evo",
    "mysql+pymysql://evo:secret@127.0.0.1:1/evo",
    "postgresql://127.0.0.1:1/evo?user=evo&password=secret",
]


@pytest.mark.parametrize("in_space", [False, True])
@pytest.mark.parametrize("url", _URLS)
def test_a_storage_password_is_never_shown(
    tmp_path, tiny_family, capsys, monkeypatch, url, in_space
):
    import evomerge.search.distributed.workers as workers

    base, fts = tiny_family
    space = write_space(tmp_path / "space.yml", base, fts)
    flag = ["--storage", url]
    if in_space:
        data = yaml.safe_load(space.read_text())
        data["study"] = {"storage": url}
        space.write_text(yaml.safe_dump(data))
        flag = []
    results = ["--results-dir", str(tmp_path / "r")]
    for verb in (["results"], ["report"], ["export", "-o", str(tmp_path / "x.yml")]):
        code = main([verb[0], str(space), *verb[1:], *flag, *results])
        out = capsys.readouterr()
        assert code == 2 and "secret" not in out.out + out.err, out
        assert "***" in out.err and "127.0.0.1" in out.err, out.err  # the URL is still named
    # a search opens the storage last, once the models and the evaluator are ready
    with pytest.raises(EvomergeError) as e:
        prepare(
            space,
            evaluator=TaskVectorEvaluator(base, fts),
            storage=url if flag else None,
            results_dir=tmp_path / "r",
            log=lambda m: None,
        )
    assert "secret" not in str(e.value) and "***" in str(e.value)
    # `search --workers` names the storage its workers share
    monkeypatch.setattr(workers, "run_workers", lambda argv, devices: 1)
    code = main(["search", str(space), "--workers", "1", "--device", "cpu", *flag, *results])
    out = capsys.readouterr()
    assert code == 1 and "secret" not in out.out + out.err and "***" in out.out, out


def test_a_storage_failure_mid_run_hides_the_password(monkeypatch, capsys):
    import sqlite3

    from optuna.exceptions import StorageInternalError

    import evomerge.cli as cli

    url = "postgresql://evo:secret@db/evo"

    def failing(args):
        try:
            raise sqlite3.OperationalError(f"lost {url} (password secret)")
        except sqlite3.OperationalError as e:
            raise StorageInternalError("commit failed") from e

    monkeypatch.setattr(cli, "_run", failing)
    err = _one_line_error(capsys, "results", "space.yml", "--storage", url)
    assert "secret" not in err and "postgresql://evo:***@db/evo" in err


# ---------------------------------------------------------------- counts on the command line


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["search", "{space}", "--threads", "-1"], "--threads"),
        (["search", "{space}", "--threads", "0"], "--threads"),
        (["search", "{space}", "--trials", "0"], "--trials"),
        (["search", "{space}", "--workers", "-2"], "--workers"),
        (["search", "{space}", "--seed", "-1"], "--seed"),
        (["search", "{space}", "--threads", "two"], "--threads"),
        (["results", "{space}", "--top", "-3"], "--top"),
        (["results", "{space}", "--top", "0"], "--top"),
        (["export", "{space}", "-o", "x.yml", "--trial", "-1"], "--trial"),
        (["merge", "{space}", "out", "--seed", "-5"], "--seed"),
        (["moe", "{space}", "out", "--seed", "-5"], "--seed"),
        (["zoo", "--seed", "-1", "--out", "{tmp}/z"], "--seed"),
        (["zoo", "--seed", str(2**64), "--out", "{tmp}/z"], "--seed"),
        (["moe", "{space}", "out", "--seed", str(2**64)], "--seed"),
    ],
)
def test_a_bad_count_is_one_line_before_anything_runs(tmp_path, capsys, argv, flag):
    space = tmp_path / "space.yml"
    space.write_text("merge_method: linear\n")
    argv = [a.format(space=space, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and flag in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yml"]


# ---------------------------------------------------------------- closed pipes


@pytest.mark.slow
def test_a_closed_stdout_ends_quietly(study, monkeypatch, capsys):
    root, space, results = study

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    code = main(["results", str(space), "--results-dir", str(results), "--all"])
    assert code == 128 + signal.SIGPIPE
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_results_into_head_exits_quietly(study):
    """``evomerge results ... | head -1``, for real: the reader closes the pipe at once."""
    root, space, results = study
    cmd = [
        sys.executable,
        "-m",
        "evomerge.cli",
        "results",
        str(space),
        "--results-dir",
        str(results),
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # as `head -1` does once it has its line (here: before any)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 128 + signal.SIGPIPE
    assert err == "", err


# ---------------------------------------------------------------- unwritable outputs


@pytest.fixture
def unwritable(tmp_path):
    """A folder in which nothing can be created: read-only by mode, or (for root, whom modes do
    not stop) a folder of sysfs, where even root may not create files."""
    d = tmp_path / "read_only"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").write_text("x")
    except OSError:
        yield d
        d.chmod(0o755)
        return
    (d / "probe").unlink()
    d.chmod(0o755)
    for candidate in (Path("/sys/kernel"), Path("/sys")):
        try:
            (candidate / "evomerge-probe").write_text("x")
        except OSError:
            yield candidate
            return
    pytest.skip("no folder here refuses a new file")


@pytest.mark.slow
def test_report_into_an_unwritable_folder_is_one_line(study, unwritable, capsys, tmp_path):
    root, space, results = study
    # the report goes to results/<study>/report: make that an unwritable folder
    report = results / "space" / "report"
    if report.exists():
        import shutil

        shutil.rmtree(report)
    report.symlink_to(unwritable, target_is_directory=True)
    try:
        err = _one_line_error(capsys, "report", str(space), "--results-dir", str(results))
    finally:
        report.unlink()
    assert str(report) in err and ("permission" in err or "read-only" in err.lower())


@pytest.mark.slow
def test_export_and_merge_into_an_unwritable_folder_are_one_line(
    study, unwritable, capsys, tmp_path, tiny_family
):
    root, space, results = study
    common = ["export", str(space), "--results-dir", str(results)]
    before = _tree(root)
    err = _one_line_error(capsys, *common, "-o", str(unwritable / "best.yml"))
    assert "-o" in err and "best.yml" in err
    # --merge into a folder that cannot be made: the recipe written first is removed again
    out = tmp_path / "best.yml"
    err = _one_line_error(capsys, *common, "-o", str(out), "--merge", str(unwritable / "m"))
    assert str(unwritable / "m") in err and not out.exists()
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {tiny_family[1][0]}\n    parameters: {{weight: 1.0}}\n"
    )
    err = _one_line_error(capsys, "merge", str(recipe), str(unwritable / "m"))
    assert str(unwritable / "m") in err
    assert _tree(root) == before


# ---------------------------------------------------------------- refusals touch nothing


def _refusals(root: Path, space: Path, results: Path) -> list[tuple[list[str], str]]:
    (root / "exists.yml").write_text("# the user's file\n")
    (root / "full").mkdir(exist_ok=True)
    (root / "full" / "keep.txt").write_text("the user's model\n")
    recipe = root / "recipe.yml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n  - model: /nowhere\n    parameters: {weight: 1.0}\n"
    )
    moe = root / "moe.yml"
    moe.write_text(
        "base_model: /nowhere\ngate_mode: random\nexperts:\n  - source_model: /a\n  - source_model: /b\n"
    )
    common = ["export", str(space), "--results-dir", str(results)]
    return [
        ([*common, "-o", str(root / "exists.yml")], "file exists"),
        ([*common, "-o", str(root / "new.yml"), "--merge", str(root / "full")], "not empty"),
        ([*common, "-o", str(root / "new.yml"), "--trial", "99"], "has no trial 99"),
        ([*common, "-o", str(root / "exists.yml"), "--trial", "99"], "file exists"),
        (["merge", str(recipe), str(root / "full")], "not empty"),
        (["moe", str(moe), str(root / "full")], "not empty"),
    ]


@pytest.mark.slow
def test_commands_that_refuse_leave_every_file_as_it_was(study, capsys):
    root, space, results = study
    for argv, words in _refusals(root, space, results):
        before = _tree(root)
        err = _one_line_error(capsys, *argv)
        assert words in err, (argv, err)
        assert _tree(root) == before, argv


@pytest.mark.slow
def test_a_study_without_a_completed_trial_exports_nothing(tmp_path, tiny_family, capsys):
    space, results = _searched(tmp_path, tiny_family, _FailingEvaluator, trials=1, finalists=0)
    before = _tree(tmp_path)
    err = _one_line_error(
        capsys, "export", str(space), "--results-dir", str(results), "-o", str(tmp_path / "b.yml")
    )
    assert "no completed trial" in err
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------- space files


@pytest.mark.parametrize(
    "content",
    [
        b'\x98\x01\x00\x00\x00\x00\x00\x00{"__metadata__":{}}',  # a safetensors header
        b"p\x00\x00\x00\x00\x00\x00\x00{}",  # one whose length byte is ASCII: valid UTF-8, with NULs
        "merge_method: linear\n# caf\xe9\n".encode("latin-1"),
    ],
)
@pytest.mark.parametrize("verb", ["search", "results", "report", "export", "merge"])
def test_a_space_file_that_is_not_text_is_one_line(tmp_path, capsys, content, verb):
    f = tmp_path / "model.safetensors"
    f.write_bytes(content)
    argv = [verb, str(f)]
    argv += {"export": ["-o", str(tmp_path / "x.yml")], "merge": [str(tmp_path / "out")]}.get(
        verb, ["--results-dir", str(tmp_path / "r")]
    )
    err = _one_line_error(capsys, *argv)
    assert str(f) in err and ("not UTF-8" in err or "NUL" in err or "not a YAML text file" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def _big_space(n: int) -> dict:
    models = [
        {"model": f"/nowhere/org/model-{i}", "parameters": {"weight": {"range": [0.0, 1.0]}}}
        for i in range(n)
    ]
    models[-1]["parameters"]["wieght"] = 0.5  # found only once every model has been read
    return {"merge_method": "linear", "models": models, "dtype": "float32"}


def _seconds(data: dict) -> float:
    best = float("inf")
    for _ in range(3):  # the least of three: other processes share the cores
        t = time.perf_counter()
        with pytest.raises(ConfigError, match="wieght"):
            parse_space(data, "big.yml")
        best = min(best, time.perf_counter() - t)
    return best


def test_a_large_space_is_read_in_linear_time(tmp_path, capsys):
    # The parse after YAML (libyaml's, linear): 8x the models must take about 8x the time. The
    # quadratic name count and list of used directives made it ~30x (a 50,000-model space: minutes).
    small, large = _big_space(500), _big_space(4000)
    ratio = _seconds(large) / _seconds(small)
    assert ratio < 16, ratio
    f = tmp_path / "large.yml"
    f.write_text(yaml.safe_dump(large))
    err = _one_line_error(capsys, "results", str(f), "--results-dir", str(tmp_path / "r"))
    assert "models[3999].parameters.wieght" in err


def test_a_huge_file_is_refused_by_its_size(tmp_path, capsys):
    from evomerge.io import MAX_YAML_BYTES

    f = tmp_path / "huge.yml"
    with open(f, "wb") as fh:
        fh.truncate(MAX_YAML_BYTES + 1)  # sparse: no time spent writing it
    t = time.perf_counter()
    err = _one_line_error(capsys, "search", str(f), "--results-dir", str(tmp_path / "r"))
    assert time.perf_counter() - t < 30
    assert str(f) in err and "MB" in err


# ---------------------------------------------------------------- silently accepted


def test_two_baselines_with_the_same_name_are_refused(tmp_path, tiny_family):
    base, fts = tiny_family
    hand = {
        "merge_method": "linear",
        "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0}}],
    }
    for names in (["mine", "mine"], [None, "hand_0"]):
        baselines = [{"recipe": hand} if n is None else {"name": n, "recipe": hand} for n in names]
        space = write_space(tmp_path / "space.yml", base, fts, baselines=baselines)
        with pytest.raises(ConfigError, match=r"search.baselines\[1\].name: .*named twice"):
            load_space(space)


@pytest.mark.parametrize(
    "where",
    ["models[0].parameters.weight", "parameters.lambda", "slices[0].sources[0].parameters.weight"],
)
def test_per_layers_larger_than_the_layers_is_refused(tmp_path, tiny_family, where):
    base, fts = tiny_family  # tiny models have 4 layers
    space = yaml.safe_load(write_space(tmp_path / "space.yml", base, fts).read_text())
    space["merge_method"] = "task_arithmetic"
    for m in space["models"]:
        m["parameters"].pop("density")
    if where.startswith("slices"):
        del space["models"], space["parameters"]
        space["merge_method"] = "linear"
        space["slices"] = [
            {
                "sources": [
                    {"model": str(f), "layer_range": [0, 3], "parameters": {"weight": 0.5}}
                    for f in fts
                ]
            }
        ]
        space["slices"][0]["sources"][0]["parameters"]["weight"] = {
            "range": [0.0, 1.0],
            "per_layers": 4,
        }
    elif where == "parameters.lambda":
        space["parameters"]["lambda"]["per_layers"] = 5
    else:
        space["models"][0]["parameters"]["weight"]["per_layers"] = 5
    f = tmp_path / "space.yml"
    f.write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError, match=re.escape(f"{where}.per_layers: ")) as e:
        prepare(
            f,
            evaluator=TaskVectorEvaluator(base, fts),
            results_dir=tmp_path / "r",
            log=lambda m: None,
        )
    n = 3 if where.startswith("slices") else 4
    assert f"the {n} layers" in str(e.value) and f"allowed: 1 to {n}" in str(e.value)
    assert not (tmp_path / "r").exists()
    # one group per model or slice is allowed
    text = (
        f.read_text()
        .replace("per_layers: 5", "per_layers: 4")
        .replace("per_layers: 4", f"per_layers: {n}")
    )
    f.write_text(text)
    prepare(
        f, evaluator=TaskVectorEvaluator(base, fts), results_dir=tmp_path / "r", log=lambda m: None
    )
