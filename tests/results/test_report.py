"""``make_report`` on synthetic results tables in the ``trials.csv`` schema."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from evomerge import contamination as flags
from evomerge.results.report import make_report, param_importances

NAN = math.nan
FILES = ["history.png", "importance.png", "parallel.png", "holdout.png", "flags.png", "report.md"]
RED = np.array([214, 39, 40]) / 255  # the colour of failed trials and overfit points


def _row(number, state="COMPLETE", score=NAN, baseline="", **kw):
    row = {
        "number": number,
        "state": state,
        "baseline": baseline,
        "method": "ties",
        "score": score,
        "score_se": 0.02 if not math.isnan(score) else NAN,
        "s_zoo_add": score,
        "s_zoo_sub": score,
        "validation": NAN,
        "validation_se": NAN,
        "test": NAN,
        "test_se": NAN,
        "h_zoo_add": NAN,
        "merge_s": 0.5,
        "eval_s": 1.0,
        "digest": "ab12",
        "error": "",
    }
    for c in flags.FLAG_COLUMNS:
        row[c], row[f"{c}_evidence"] = False, ""
    row.update(kw)
    return row


def _table() -> pd.DataFrame:
    rows = []
    for n in range(10):  # trial 7 is the best; 3 and 5 fail; 9 is still running
        score = {3: NAN, 5: NAN, 9: NAN, 7: 0.90}.get(n, 0.40 + 0.04 * n)
        state = "FAIL" if n in (3, 5) else "RUNNING" if n == 9 else "COMPLETE"
        rows.append(
            _row(
                n,
                state,
                score,
                p_weight_0=0.1 * n,
                p_density_1=1.0 - 0.05 * n,
                p_t_self_attn_0=(n * 7 % 10) / 10,
                p_method="ties" if n % 2 else "dare",
                error="CUDA out of memory" if state == "FAIL" else "",
            )
        )
    rows[7].update(
        validation=0.60,
        validation_se=0.03,
        v_zoo_add=0.60,
        overfit=True,
        overfit_evidence="search 0.900 ± 0.020 vs validation 0.600 ± 0.030: gap +0.300 > 2 SE 0.072",
    )
    rows[8].update(validation=0.71, validation_se=0.03, test=0.69, test_se=0.03)
    rows.append(_row(None, score=0.50, baseline="source:models/a", test=0.49, test_se=0.03))
    rows.append(_row(None, score=0.45, baseline="linear_average", test=0.46, test_se=0.03))
    df = pd.DataFrame(rows)
    df["merge_lineage"] = True  # a source is a merge: a study-wide column
    df["merge_lineage_evidence"] = "models/a <- merge of (x, y) [models/a: tags: merge]"
    df["number"] = df["number"].astype("Int64")
    return df


def _png(path: Path) -> np.ndarray:
    img = imread(path)  # raises on anything that is not a valid PNG
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img[..., :3].std() > 0.01  # not a blank canvas
    return img


def _red_pixels(img: np.ndarray) -> int:
    return int((np.abs(img[..., :3] - RED).max(axis=-1) < 0.06).sum())


def test_full_table_writes_every_figure_and_the_markdown(tmp_path):
    df = _table()
    out = make_report(df, tmp_path / "rep", study_name="demo")
    assert [p.name for p in out] == FILES
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == sorted(FILES)  # no temp left
    imgs = {p.name: _png(p) for p in out if p.suffix == ".png"}
    assert _red_pixels(imgs["history.png"]) > 0  # failed trials drawn as red x
    assert _red_pixels(imgs["holdout.png"]) > 0  # trial 7 is overfit-flagged
    assert _red_pixels(imgs["flags.png"]) > 0  # raised flags are red bars
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith("# evomerge report: demo\n")
    assert "7 completed, 2 failed, 1 running searched trials; 2 baselines." in md
    for name in FILES[:-1]:
        assert f"]({name})" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| trial")]
    # by score: #7 .90, #8 .72, #6 .64, #4 .56, source .50, #2 .48, linear .45, #1 .44, #0 .40
    assert [ln.split(" | ")[0][2:].removesuffix(" (chosen)") for ln in table] == [
        "#7",
        "#8",
        "#6",
        "#4",
        "[source:models/a]",
        "#2",
        "[linear_average]",
        "#1",
        "#0",
    ]
    assert table[0].startswith("| #7 | 0.9000 | 0.0200 | 0.6000 | - | LO | ties |")
    # the chosen trial: the best validation score (#8), tested; #7 searched better but is not it
    assert table[1].startswith("| #8 (chosen) | 0.7200 | 0.0200 | 0.7100 | 0.6900 |")
    assert "## The chosen trial: #8" in md
    assert "- Test score: 0.6900 ± 0.0300, which chose nothing: an unbiased estimate" in md
    assert table[0].endswith("| weight_0=0.700 density_1=0.650 t_self_attn_0=0.900 |")
    assert flags.legend() in md.splitlines()
    assert "- `overfit`: **raised** on 1 of 12 rows:" in md
    assert "  - search 0.900 ± 0.020 vs validation 0.600 ± 0.030: gap +0.300 > 2 SE 0.072" in md
    assert "- `merge_lineage`: **raised** on 12 of 12 rows:" in md
    assert md.count("models/a <- merge of (x, y)") == 1  # study-wide evidence shown once
    assert "- `memorization_probe`: not raised" in md
    assert "Parameter importances: |Spearman rank correlation| with the objective." in md


def test_holdout_plot_has_no_red_without_an_overfit_flag(tmp_path):
    df = _table()
    df["overfit"] = False
    df.loc[df["state"] == "FAIL", "state"] = "COMPLETE"  # and no failed trials either
    df.loc[df["number"].isin([3, 5]).fillna(False), "score"] = 0.5
    out = make_report(df, tmp_path, study_name="clean")
    assert _red_pixels(_png(tmp_path / "holdout.png")) == 0
    assert _red_pixels(_png(tmp_path / "history.png")) == 0
    assert "- `overfit`: not raised" in out[-1].read_text()


def test_spearman_fallback_on_hand_computed_values():
    # objective 1, 3, 2, 4 (trials 0..3)
    df = pd.DataFrame(
        [
            _row(
                i,
                score=s,
                p_a=float(i + 1),
                p_b=float(4 - i),
                p_c=7.0,
                p_cat=["x", "y", "x", "y"][i],
                p_sparse=[1.0, NAN, 2.0, NAN][i],
            )
            for i, s in enumerate([0.1, 0.3, 0.2, 0.4])
        ]
    )
    imp, method = param_importances(df)
    assert method == "|Spearman rank correlation| with the objective"
    # ranks x 1,2,3,4 vs y 1,3,2,4: d = 0,-1,1,0, rho = 1 - 6*2/(4*15) = 0.8; p_b reversed: |-0.8|
    assert imp == {"p_a": pytest.approx(0.8), "p_b": pytest.approx(0.8)}
    # constant, categorical and 2-point columns are left out; baselines and failures ignored
    df2 = pd.concat(
        [
            df,
            pd.DataFrame(
                [_row(None, score=9.0, baseline="b", p_a=0.0), _row(9, state="FAIL", p_a=100.0)]
            ),
        ]
    )
    assert param_importances(df2)[0] == imp
    assert param_importances(df.head(2)) == ({}, method)


def test_importances_from_an_optuna_study(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(
        lambda t: 3 * t.suggest_float("weight_0", 0, 1) + 0.01 * t.suggest_float("density_1", 0, 1),
        n_trials=16,
    )
    df = pd.DataFrame(
        [
            _row(t.number, score=t.value, **{f"p_{k}": v for k, v in t.params.items()})
            for t in study.trials
        ]
    )
    imp, method = param_importances(df, study=study)
    assert method == "Optuna fANOVA" and list(imp) == ["p_weight_0", "p_density_1"]
    assert imp["p_weight_0"] > 0.9
    out = make_report(df, tmp_path, study_name="s", study=study)
    assert "Parameter importances: Optuna fANOVA." in out[-1].read_text()
    # a study with too few trials falls back to the table
    tiny = optuna.create_study()
    assert param_importances(df, study=tiny)[1].startswith("|Spearman")


@pytest.mark.parametrize("case", ["single", "no_holdout", "no_params", "all_failed", "empty"])
def test_degenerate_tables_still_write_valid_figures(tmp_path, case):
    df = _table()
    if case == "single":
        df = df[df["number"] == 7]
    elif case == "no_holdout":
        df = df.assign(validation=NAN, validation_se=NAN, test=NAN, test_se=NAN, overfit=False)
    elif case == "no_params":  # a one-point space: nothing sampled
        df = df.drop(columns=[c for c in df.columns if c.startswith("p_")])
    elif case == "all_failed":
        df = df[df["state"] == "FAIL"]
    else:
        df = df.iloc[0:0]
    out = make_report(df, tmp_path, study_name=case)
    assert [p.name for p in out] == FILES
    for p in out[:-1]:
        _png(p)
    md = out[-1].read_text()
    assert md.startswith(f"# evomerge report: {case}\n")
    if case in ("all_failed", "empty"):
        assert "No completed trials." in md
    if case == "single":
        assert "1 completed, 0 failed, 0 running" in md
        assert [ln for ln in md.splitlines() if ln.startswith("| #")][0].startswith(
            "| #7 (chosen) | 0.9000"
        )


def test_multiple_objectives_and_csv_round_trip(tmp_path):
    path = tmp_path / "trials.csv"
    _table().to_csv(path, index=False)
    df = pd.read_csv(path)  # flags come back as bools/strings, numbers with NaN
    out = make_report(
        df, tmp_path / "r", study_name="csv", objective_columns=["score", "s_zoo_add"]
    )
    h2 = _png(out[0])
    h1 = _png(make_report(df, tmp_path / "r1", study_name="csv")[0])
    assert h2.shape[0] > 1.5 * h1.shape[0]  # one panel per objective
    assert "- `overfit`: **raised** on 1 of 12 rows:" in out[-1].read_text()
    with pytest.raises(ValueError, match="nope"):
        make_report(df, tmp_path / "bad", study_name="x", objective_columns=["nope"])


def test_mixture_parameters_read_as_sampled(tmp_path):
    """A mixture's whole-number parameters (experts per token, a prompt's item index), stored as floats
    beside merge trials' NaN, read as whole numbers; choices as written."""
    rows = [
        _row(
            0,
            score=0.35,
            method="moe",
            **{
                "p_moe.k": 2.0,
                "p_moe.prompts.rot": 15.0,
                "p_moe.gate_mode": "hidden",
                "p_moe.use.rot": True,
                "p_lambda": NAN,
            },
        ),
        _row(
            1,
            score=0.58,
            method="task_arithmetic",
            **{
                "p_moe.k": NAN,
                "p_moe.prompts.rot": NAN,
                "p_moe.gate_mode": NAN,
                "p_moe.use.rot": NAN,
                "p_lambda": 0.6434,
            },
        ),
    ]
    make_report(pd.DataFrame(rows), tmp_path / "rep", study_name="moe")
    table = [
        ln
        for ln in (tmp_path / "rep" / "report.md").read_text().splitlines()
        if ln.startswith("| #")
    ]
    assert table[0].endswith("| task_arithmetic | lambda=0.643 |")
    assert table[1].endswith(
        "| moe | moe.k=2 moe.prompts.rot=15 moe.gate_mode=hidden moe.use.rot=True |"
    )


def test_a_study_of_mixtures_only_plots_which_experts_take_part(tmp_path):
    """Every searched trial a mixture: ``p_moe.use.*`` is a bool column (no NaN from merge rows),
    which the parallel-coordinates plot scaled with a numpy-bool subtraction (a TypeError)."""
    rows = [
        _row(
            n,
            score=0.3 + 0.05 * n,
            method="moe",
            **{"p_moe.use.rot": n % 2 == 0, "p_moe.k": 1 + n % 2},
        )
        for n in range(4)
    ]
    df = pd.DataFrame(rows)
    assert df["p_moe.use.rot"].dtype == bool
    out = make_report(df, tmp_path / "rep", study_name="moe_only")
    _png(next(p for p in out if p.name == "parallel.png"))


def test_report_without_matplotlib_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    """matplotlib is the ``report`` extra: without it, evomerge report says how to install it
    (exit 2) before it reads the study or writes anything."""
    import importlib.util

    from evomerge.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "matplotlib" else real(name, *a, **k),
    )
    space = tmp_path / "space.yml"
    space.write_text("not read: the check comes first\n")
    assert main(["report", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'evomerge[report]'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yml"]
