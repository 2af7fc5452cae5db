"""Real servers the tests start on 127.0.0.1: PostgreSQL (Debian's ``postgresql``) and
``make server`` (an MLflow tracking server)."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.conftest import REPO


class Unavailable(Exception):
    """The server cannot be installed or started here; the message says why."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_loopback_only(port: int) -> None:
    """The machine's own network address must not answer on ``port``."""
    address = socket.gethostbyname(socket.gethostname())
    if not address.startswith("127."):
        with socket.socket() as sock:
            assert sock.connect_ex((address, port)) != 0, f"{address}:{port} answers"


class Postgres:
    """A throw-away PostgreSQL cluster with password authentication, run as ``postgres``."""

    user, password, database = "cnnlab", "s3cret-pw", "mlflow"

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="cnnlab-pg-"))
        self.data = self.folder / "data"

    @property
    def uri(self) -> str:
        credentials = f"{self.user}:{self.password}"
        return f"postgresql://{credentials}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not binaries:
            raise Unavailable("PostgreSQL is not installed (apt: postgresql)")
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as error:
            raise Unavailable("no postgres user to run the server as") from error
        if os.geteuid() != 0:
            raise Unavailable("the tests start PostgreSQL as root, through runuser")
        self.bin = Path(binaries[-1])
        (self.folder / "password").write_text(self.password)
        shutil.chown(self.folder, owner.pw_uid, owner.pw_gid)
        shutil.chown(self.folder / "password", owner.pw_uid, owner.pw_gid)
        self._as_postgres(
            "initdb", "-D", str(self.data), "-U", self.user, "--auth=scram-sha-256",
            f"--pwfile={self.folder / 'password'}",
        )  # fmt: skip
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        log = str(self.folder / "postgres.log")  # not our pipes: they would stay open
        self._as_postgres("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        import psycopg

        # CREATE DATABASE runs outside a transaction.
        with psycopg.connect(self.uri.rsplit("/", 1)[0] + "/postgres", autocommit=True) as db:
            db.execute(f"CREATE DATABASE {self.database}")

    def stop(self) -> None:
        if self.data.exists():
            self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def query(self, sql: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.uri) as connection:
            return connection.execute(sql).fetchall()

    def _as_postgres(self, tool: str, *args: str) -> None:
        command = ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise Unavailable(f"{tool} failed: {result.stderr.strip() or result.stdout.strip()}")


class MakeServer:
    """``make server`` on a free port of 127.0.0.1, with ``store`` as its backend store."""

    def __init__(self, store: str, artifacts: Path, port: int | None = None) -> None:
        """``port``: a given one (a server started again where its clients look for it)."""
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        # Its output goes to a file: a pipe nobody reads fills up, and the server then hangs
        # on its next log line (a long test's requests are many lines).
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the server)
        self.process = subprocess.Popen(
            [
                "make",
                "--no-print-directory",
                "server",
                f"SERVER_PORT={self.port}",
                f"SERVER_STORE={store}",
                f"MLFLOW_ARTIFACTS={artifacts}",
            ],
            cwd=REPO,
            start_new_session=True,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"make server exited: {self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise AssertionError(f"make server did not answer on {self.uri} within {timeout} s")

    def search_experiments(self) -> list[dict]:
        request = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/experiments/search",
            data=json.dumps({"max_results": 100}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response).get("experiments", [])

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> str:
        """Stop the server; returns what it printed."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return self.output()
