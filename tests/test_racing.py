"""The racing sweeper: the race's turns on scores given by hand, its bounds and bad
settings, its decision against the full grid on simulated studies, and (slow) a real raced
sweep through Hydra, MLflow and the report, continued with sweep.resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from scipy.stats import binomtest

from cnnlab.checks import ConfigError
from cnnlab.racing import Race, RaceSettings, race_against_grid
from cnnlab.report import build_report, simulate
from tests.conftest import cnnlab_train, run_sweep
from tests.test_continue import _env, _kill_when, _runs, _sweep


def run(race: Race, score) -> list[list[tuple[str, int]]]:
    """Drive ``race`` to its end with ``score(group, seed)``; the rounds it asked for."""
    rounds = []
    while batch := race.next_round():
        rounds.append(batch)
        for group, seed in batch:
            race.record(group, seed, score(group, seed))
    return rounds


def test_a_clearly_worse_group_stops_early_and_the_rest_race_on() -> None:
    scores = {
        "max": [0.981, 0.978, 0.983, 0.979, 0.982, 0.980],
        "avg": [0.980, 0.981, 0.979, 0.982, 0.978, 0.981],
        "none": [0.90, 0.91, 0.905],
    }
    race = Race(list(scores), RaceSettings(n0=3, max_seeds=6))
    rounds = run(race, lambda group, seed: scores[group][seed])
    assert rounds[0] == [(g, s) for g in scores for s in (0, 1, 2)]
    assert race.dropped == {"none": 3}  # separated after the first round
    assert rounds[1] == [("max", 3), ("avg", 3)]
    assert race.alive == ["max", "avg"] and race.asked == {"max": 6, "avg": 6, "none": 3}
    assert race.jobs == 9 + 2 * 3 and race.full_grid == 18
    assert race.summary()["racing.dropped"] == "none@3"


def test_the_race_stops_at_max_jobs_before_a_round_would_pass_it() -> None:
    race = Race(["a", "b"], RaceSettings(n0=2, max_seeds=10, max_jobs=7))
    run(race, lambda group, seed: 0.9 + 0.001 * ((seed * 7 + len(group)) % 3))
    assert race.jobs == 6  # 4, then 2 more; a fourth round would make 8


def test_a_failed_job_is_a_seed_not_run() -> None:
    race = Race(["a", "b"], RaceSettings(n0=2, max_seeds=3))
    run(race, lambda group, seed: None if (group, seed) == ("b", 1) else 0.9 + seed / 1000)
    assert race.scores["b"] == {0: 0.9, 2: 0.902} and race.asked["b"] == 3


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n0": 1}, r"racing: n0=1, max_seeds=10; valid: 2 <= n0 <= max_seeds"),
        ({"n0": 5, "max_seeds": 4}, r"racing: n0=5, max_seeds=4; valid"),
        ({"alpha": 1.5}, r"racing: alpha=1.5; valid: 0 < alpha < 1"),
        ({"max_jobs": 0}, r"racing: max_jobs=0; valid: a positive count"),
    ],
)
def test_bad_race_settings_name_the_value_and_the_valid_range(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        RaceSettings(**settings)


STUDIES = {
    "clear": simulate.pooling_gaps(0.004, 0.006, 0.008, 0.012, 0.03),  # a clear winner
    "graded": simulate.pooling_gaps(0.002, 0.004, 0.006, 0.01, 0.02),  # close calls at the top
}


@pytest.mark.parametrize("study", list(STUDIES))
def test_the_race_picks_what_the_full_grid_picks_in_95_percent_for_fewer_jobs(study) -> None:
    """Same decision: the race's leader is the full grid's best or tied with it (the group
    table's test at 10 seeds), on the same simulated scores."""
    truth = simulate.Truth({simulate.POOLING: simulate.POOLING_LEVELS}, effects=STUDIES[study])
    rates = race_against_grid(truth, RaceSettings(n0=3, max_seeds=10), 100, seed=8)
    agreed = round(rates.same_winner * rates.sims)
    assert binomtest(agreed, rates.sims, 0.95, alternative="less").pvalue > 0.01, rates
    assert rates.jobs < 0.8, rates


@pytest.mark.slow
def test_a_raced_sweep_runs_records_reports_and_continues(tmp_path: Path) -> None:
    overrides = ("experiment=head_ablation", "hydra/sweeper=racing", "hydra.sweeper.n0=2",
                 "hydra.sweeper.max_seeds=3", f"hydra.sweep.dir={tmp_path}/multirun")  # fmt: skip
    result, client, parent, children = run_sweep(tmp_path, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    tags = parent.data.tags
    assert int(tags["racing.jobs"]) == len(children) and tags["racing.full_grid_jobs"] == "9"
    assert 6 <= len(children) <= 9 and parent.info.status == "FINISHED"
    seeds = {(c.data.tags["group"], c.data.tags["seed"]) for c in children}
    assert {("model.head=fc", "0"), ("model.head=gap", "1")} <= seeds  # every group runs n0
    assert len(seeds) == len(children)  # no job twice
    page = build_report(client, "sweep", out=tmp_path / "report", attach=False)
    assert f"Raced: {len(children)} jobs against 9 for the full grid" in page.read_text()
    again, client, parent_again, children_again = run_sweep(tmp_path, *overrides,
                                                            "sweep.resume=latest")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert parent_again.info.run_id == parent.info.run_id
    assert f"this start: 0 trained, {len(children)} kept" in again.stdout
    assert parent_again.data.tags["racing.jobs"] == tags["racing.jobs"]
    assert len(children_again) == len(children)


def test_a_bad_race_setting_is_one_line_before_any_store_or_run(tmp_path: Path) -> None:
    """Hydra makes the sweeper after the sweep's callback opened the store and its parent
    run: the callback checks the race's settings first."""
    result = cnnlab_train(
        "-m", "experiment=head_ablation", "hydra/sweeper=racing", "hydra.sweeper.n0=1",
        f"hydra.sweep.dir={tmp_path}/multirun", env=_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cnnlab: error: racing: n0=1, max_seeds=10; valid: 2 <= n0 <= max_seeds (a paired "
        "test needs two seeds)"
    ]
    assert not (tmp_path / "mlflow.db").exists()


def _race_runs(tmp_path: Path) -> list:
    try:
        return _runs(tmp_path)[2]
    except Exception:  # the store or the experiment is still being made
        return []


@pytest.mark.slow
def test_a_race_killed_mid_round_continues_to_the_same_kind_of_end(tmp_path: Path) -> None:
    """SIGKILL while the first round's fourth job trains; sweep.resume=latest runs the race
    again from its start: finished jobs are kept with their scores, the killed one goes on
    from its checkpoint or trains again, and the race ends with one FINISHED parent, every
    job once."""
    race = ["experiment=head_ablation", "hydra/sweeper=racing", "hydra.sweeper.n0=2",
            "hydra.sweeper.max_seeds=3", "trainer.max_epochs=4"]  # fmt: skip
    _kill_when(tmp_path, race, lambda: len(_race_runs(tmp_path)) >= 4, "the fourth job")
    continued = _sweep(tmp_path, *race, "sweep.resume=latest")
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert "this start: " in continued.stdout and " 3 kept" in continued.stdout
    _, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    live = [c for c in children if "cnnlab.superseded_by" not in c.data.tags]
    assert {c.info.status for c in live} == {"FINISHED"}
    jobs = [(c.data.tags["group"], c.data.tags["seed"]) for c in live]
    assert len(jobs) == len(set(jobs)) == int(parents[0].data.tags["racing.jobs"])
    for head in ("fc", "gap", "nin"):  # every group ran the first round
        assert {("model.head=" + head, seed) for seed in ("0", "1")} <= set(jobs)
