"""A real single-node Slurm cluster for the tests, from Debian's ``slurm-wlm`` and ``munge``.

Controller and node are this machine with its real CPU count; state, spool and logs live in
a temporary folder and the daemons listen on free ports, so nothing of the system's own
Slurm set-up (if any) is touched. Clients find it through ``SLURM_CONF``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.servers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "srun", "sbatch", "scontrol")


class Unavailable(Exception):
    """Slurm cannot be installed or started here; the message says why."""


class SlurmCluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        missing = [name for name in DAEMONS if shutil.which(name) is None]
        if missing:
            raise Unavailable(f"not installed: {', '.join(missing)} (apt: slurm-wlm munge)")
        if os.geteuid() != 0:
            raise Unavailable("slurmd must run as root to start jobs as their user")
        self._start_munge()
        self._write_conf()
        for daemon in ("slurmctld", "slurmd"):
            self._run(daemon, "-f", str(self.conf))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            probe = self._run("srun", "-N1", f"-n{os.cpu_count()}", "hostname", check=False)
            if probe.returncode == 0:
                return
            time.sleep(1)
        raise Unavailable(f"srun does not run: {probe.stderr.strip()}\n{self.logs()}")

    def stop(self) -> None:
        self._run("scontrol", "shutdown", check=False)
        for pid_file in self.folder.glob("*.pid"):
            try:
                pid = int(pid_file.read_text())
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.2)
                os.kill(pid, 9)
            except (ValueError, ProcessLookupError):
                pass

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text()[-2000:]}" for path in self.folder.glob("*.log")
        )

    def _start_munge(self) -> None:
        socket_dir = Path("/run/munge")
        alive = (socket_dir / "munge.socket.2").exists() and self._run("munge", "-n", check=False)
        if alive and alive.returncode == 0:
            return
        socket_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(socket_dir, "munge", "munge")
        started = self._run("munged", "--force", check=False)
        if started.returncode != 0:
            raise Unavailable(f"munged does not start: {started.stderr.strip()}")

    def _write_conf(self) -> None:
        host, folder = socket.gethostname().split(".")[0], self.folder
        for sub in ("state", "spool"):
            (folder / sub).mkdir(exist_ok=True)
        self.conf.write_text(
            f"""ClusterName=cnnlabtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=60, check=False
        )
        if check and result.returncode != 0:
            raise Unavailable(f"{' '.join(command)} failed: {result.stderr.strip()}")
        return result
