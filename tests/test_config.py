"""Config: the real Hydra tree composes into typed settings; bad values fail before training."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from cnnlab import config
from cnnlab.training.job import check_trainer_args
from tests.conftest import compose_train


def settings_for(overrides: list[str], tmp_path: Path) -> config.TrainConfig:
    return config.to_settings(compose_train(overrides, tmp_path))


def test_default_config_is_lenet5_on_mnist_logged_to_the_repo_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    settings = settings_for([], tmp_path)
    assert settings.model.name == "lenet5" and settings.data.name == "mnist"
    assert settings.data.source is config.DataSource.auto
    assert settings.logger.tracking_uri == f"sqlite:///{config.REPO_ROOT}/mlflow.db"
    assert settings.logger.experiment_name == "cnnlab"
    assert settings.paths.output_dir == str(tmp_path)
    assert settings.scheduler["max_lr"] == settings.optimizer["lr"]


def test_mlflow_environment_variables_win(tmp_path: Path, tracking_uri: str) -> None:
    settings = settings_for([], tmp_path)
    assert settings.logger.tracking_uri == tracking_uri
    assert settings.logger.experiment_name == "tests"


def test_unknown_key_fails_at_composition(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_train(["model.dropot=0.3"], tmp_path)
    assert "Key 'dropot' not in 'ModelConfig'" in str(error.value.__cause__)


def test_wrong_type_fails_at_composition(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_train(["data.batch_size=many"], tmp_path)
    assert isinstance(error.value.__cause__, ValidationError)


def test_unknown_option_in_a_group_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="lenet5"):
        compose_train(["model=resnet"], tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=0", r"optimizer.lr=0 is out of range; valid: \(0, inf\)"),
        ("optimizer.lr=-0.1", r"optimizer.lr=-0.1 is out of range; valid: \(0, inf\)"),
        ("data.batch_size=0", r"data.batch_size=0 is out of range; valid: \(0, inf\)"),
        ("model.dropout=1.0", r"model.dropout=1.0 is out of range; valid: \[0, 1\)"),
        ("model.pooling_p=0.5", r"model.pooling_p=0.5 is out of range; valid: \[1, inf\)"),
        ("model.channels=[6,0]", r"model.channels\[1\]=0 is out of range"),
    ],
)
def test_out_of_range_values_name_the_value_and_range(
    override: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(config.ConfigError, match=message):
        settings_for([override], tmp_path)


def test_unknown_trainer_argument_lists_valid_ones() -> None:
    with pytest.raises(
        config.ConfigError,
        match=r"unknown trainer argument 'max_epoch'; "
        r"valid: .*max_epochs",
    ):
        check_trainer_args({"max_epoch": 3})
    check_trainer_args({"max_epochs": 3, "limit_train_batches": 2})
