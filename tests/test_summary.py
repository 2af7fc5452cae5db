"""``python -m cnnlab.summary``: the model table without any dataset file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cnnlab.models.summary import in_words
from cnnlab.summary import summarize
from tests.conftest import compose_train, run_cli


def test_summary_of_the_default_model(tmp_path: Path) -> None:
    text = summarize(compose_train([], tmp_path))
    assert text.startswith("lenet5 on mnist (1x28x28, 10 classes)")
    assert "output sizes: stage1.conv1 24px  stage1.pool 12px  stage2.conv1 8px" in text
    assert "parameters: 44,470 total, 44,470 trainable" in text
    # 281,640 mult-adds of convolutions and matrix products: 2 FLOPs each (test_models.py).
    assert "Mult-adds per image: 281.6 K (convolutions and matrix products)" in text
    assert "FLOPs per image: 563.3 K (2 per mult-add)" in text
    assert "Units." not in text and "Total mult-adds" not in text


def test_counts_in_words() -> None:
    assert [in_words(n) for n in (0, 999, 1_000, 24_580_000, 49_160_000, 1.5e9, 2e12)] == [
        "0", "999", "1.0 K", "24.6 M", "49.2 M", "1.5 G", "2.0 T"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "params"),
    [
        (["model=alexnet_small"], "8,807,370"),
        (["model=cnn", "model.pooling=gem", "model.head=nin"], "66,028"),
    ],
)
def test_summary_of_other_presets(overrides: list[str], params: str, tmp_path: Path) -> None:
    assert f"parameters: {params} total" in summarize(compose_train(overrides, tmp_path))


def test_summary_command_needs_no_data_and_reports_bad_shapes_in_one_line(tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/never.db"}
    args = (sys.executable, "-m", "cnnlab.summary", "data.root=/nonexistent")
    good = run_cli(*args, "model=cnn", env=env)
    assert good.returncode == 0, good.stderr
    assert "cnn on mnist" in good.stdout
    assert "Mult-adds per image: 18.3 M" in good.stdout
    assert "FLOPs per image: 36.6 M (2 per mult-add)" in good.stdout
    assert "Units." not in good.stdout
    bad = run_cli(*args, "model.channels=[6,16,32]", env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("cnnlab: error: stage3.conv1: input 4, F=5")
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "never.db").exists()
