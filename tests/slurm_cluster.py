"""A real one-node Slurm cluster on localhost for the tests: munged, slurmctld and slurmd in the foreground as this
(root) process's children, without systemd, state and sockets under a short temporary directory. Debian's
`slurm-wlm` and `munge` are installed where missing (CI starts from a bare machine); where that is impossible the
caller skips loudly, with `missing()`'s reason."""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
COMMANDS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel"]


def missing() -> str | None:
    """Why no cluster can be started here, after installing the packages if they are not; None if one can."""
    if all(shutil.which(c) for c in COMMANDS):
        return None
    if os.geteuid() != 0:
        return f"Slurm is not installed and installing it ({' '.join(PACKAGES)}) needs root"
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    res = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if res.returncode:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=900)
        res = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if res.returncode or not all(shutil.which(c) for c in COMMANDS):
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"`{' '.join(install)}` failed ({res.returncode}): {tail[0]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """`env` is what a command needs to reach it (SLURM_CONF); `started_at` is when slurmctld started: it checks
    time limits (and sends --signal warnings) every 30 s from then."""

    CHECK_S = 30.0  # slurmctld's PERIODIC_TIMEOUT

    def __init__(self, max_array_size: int = 3):
        # a short root: the munge socket's path must stay under ~107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="pos-", dir="/tmp"))
        self.max_array_size = max_array_size
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}
        self.started_at = 0.0

    def write_config(self) -> None:
        r, host = self.root, socket.gethostname()
        for d in ("state", "spool", "log"):
            (r / d).mkdir()
        # CPUs as slurmd -C finds them, but at least 3 so that a 3-task array runs at once on a 2-core machine
        found = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        cpus = max(3, int(re.search(r"CPUs=(\d+)", found)[1]))
        (r / "slurm.conf").write_text("\n".join([
            "ClusterName=pobatch", f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: a requeued task waits this long (+1 s) before it may start again (default 120 s)
            f"AuthInfo=socket={r}/munge.sock,cred_expire=5",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "JobRequeue=1", "SchedulerParameters=sched_interval=2,bf_interval=2", "ReturnToService=2",
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            f"MaxArraySize={self.max_array_size}", "SlurmdParameters=config_overrides",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))

    def start(self) -> "Cluster":
        r = self.root
        self.write_config()
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.spawn(["munged", "-F", "--force", f"--key-file={key}", f"--socket={r}/munge.sock",
                    f"--pid-file={r}/munged.pid", f"--log-file={r}/log/munged.log", f"--seed-file={r}/munged.seed"])
        self.wait(lambda: (r / "munge.sock").exists(), "munged's socket")
        self.started_at = time.time()
        self.spawn(["slurmctld", "-D", "-c", "-f", str(r / "slurm.conf")])
        self.wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld")
        self.spawn(["slurmd", "-D", "-f", str(r / "slurm.conf")])
        self.wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False).stdout, "the node idle")
        return self

    def spawn(self, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{cmd[0]}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, cond, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not cond():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) before {what}: {self.logs()}")
            if time.time() > deadline:
                raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted((self.root / "log").iterdir()))

    def run(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr or res.stdout}")
        return res

    def jobs(self) -> dict[str, str]:
        """Job (array task) id -> state, of every job in the queue."""
        out = self.run("squeue", "-h", "-r", "-o", "%i %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields (the first job it shows)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout.splitlines()[0]
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_empty_queue(self, timeout: float) -> None:
        self.wait(lambda: not self.jobs(), "the queue to empty", timeout)

    def stop(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.root, ignore_errors=True)
