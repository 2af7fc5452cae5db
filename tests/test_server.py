"""``make server``: a tracking server that parallel jobs share, on PostgreSQL."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_sweep
from tests.servers import MakeServer, Postgres, Unavailable, assert_loopback_only

pytestmark = pytest.mark.slow


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    database = Postgres()
    try:
        database.start()
    except Unavailable as why:
        database.stop()
        pytest.skip(f"no PostgreSQL here: {why}")
    yield database
    database.stop()


def test_a_parallel_sweep_through_make_server_on_postgresql_loses_nothing(
    postgres: Postgres, tmp_path: Path
) -> None:
    server = MakeServer(postgres.uri, tmp_path / "artifacts")
    try:
        server.wait_ready()
        assert_loopback_only(server.port)
        result, client, parent, children = run_sweep(
            tmp_path,
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "model.head=fc,gap",
            uri=server.uri,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert sorted(r.data.tags["factor.model.head"] for r in children) == ["fc", "gap"]
        assert {r.info.status for r in children} == {"FINISHED"}
        assert parent.data.tags["jobs.finished"] == "2"
        for run in children:  # every step of every job arrived, once
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
            assert steps == sorted(set(steps)) and len(steps) == 10  # 2 epochs x 5 batches
            (checkpoint,) = client.list_artifacts(run.info.run_id, "checkpoints")
            assert checkpoint.file_size > 0  # stored through the server's artifact proxy
        # The server really kept them in PostgreSQL.
        assert postgres.query("SELECT status, count(*) FROM runs GROUP BY status") == [
            ("FINISHED", 3)
        ]
        assert (tmp_path / "artifacts").is_dir()
        # Grown by a seed and continued from another machine (another host name, another
        # folder): each job decides from the server alone, so only the new ones train.
        grown, _, again, children = run_sweep(
            tmp_path / "elsewhere",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "model.head=fc,gap",
            "seed=0,1",
            "sweep.resume=latest",
            uri=server.uri,
            host="node-b",
        )
        assert grown.returncode == 0, grown.stderr[-3000:]
        assert "this start: 2 trained, 2 kept, 0 resumed" in grown.stdout
        assert again.info.run_id == parent.info.run_id and len(children) == 4
        assert {r.info.status for r in children} == {"FINISHED"}
        hosts = {r.data.tags["seed"]: r.data.tags["cnnlab.host"] for r in children}
        assert hosts["1"] == "node-b" and hosts["0"] == socket.gethostname()
        assert again.data.tags["cnnlab.host"] == "node-b"
    finally:
        server.stop()
