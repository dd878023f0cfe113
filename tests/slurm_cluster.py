"""A two-node Slurm cluster on this machine, for the tests: munge, one slurmctld and two slurmd (n1, n2).

Nothing is installed here: Debian's `slurm-wlm` and `munge` must be on the machine (.ci/run installs them with
apt-get). Everything the daemons write lives in one temporary directory; the nodes' names resolve through one line
appended to /etc/hosts, removed again on stop; only the processes started here are stopped.

    with SlurmCluster(tmpdir) as cluster:      # raises ClusterUnavailable with the reason if it cannot start
        subprocess.run(["sbatch", ...], env=cluster.env)

or by hand: `python -m tests.slurm_cluster DIR` starts it, prints the environment to use, and stops it on Ctrl-C.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from minorsft_megatron.lifetime import die_with_parent

NODES = ("n1", "n2")
HOSTS_LINE = "127.0.0.1 n1 n2  # minorsft-megatron tests/slurm_cluster.py\n"
DAEMONS = ("munged", "slurmctld", "slurmd")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run here (a program is missing or a daemon did not come up); the message says why."""


def slurm_conf(root: Path, cpus: int, ctld_port: int, node_port: int) -> str:
    """slurm.conf for two slurmd on localhost (MULTIPLE_SLURMD): no cgroups, no accounting, state under root; job
    credentials live 10 s (default 120), which is also how long Slurm holds a requeued job (plus 1 s)."""
    return f"""ClusterName=minorsft-ci
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
SlurmdTimeout=10
MessageTimeout=10
KillWait=10
InactiveLimit=0
MinJobAge=600
NodeName=n[1-2] NodeHostname=localhost Port={node_port}-{node_port + 1} CPUs={cpus} State=UNKNOWN
PartitionName=ci Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Starts munged, slurmctld and slurmd -N n1/n2 under `root`; `env` is the environment clients need."""

    def __init__(self, root: str | os.PathLike, cpus: int = 1, ctld_port: int | None = None,
                 node_port: int | None = None):
        """Ports: slurmctld's, and the first of the two slurmd's (free ones by default)."""
        self.root = Path(root)
        self.cpus = cpus
        self.ctld_port = ctld_port or _free_ports(1, above=17000)
        self.node_port = node_port or _free_ports(2, above=self.ctld_port)
        self.procs: list[subprocess.Popen] = []
        self.added_hosts_line = False
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    # -- start ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> "SlurmCluster":
        missing = [d for d in DAEMONS + ("sbatch", "sinfo") if shutil.which(d) is None
                   and not os.path.exists(f"/usr/sbin/{d}")]
        if missing:
            raise ClusterUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        for sub in ("munge", "state", "log", "spool/n1", "spool/n2"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (self.root / "slurm.conf").write_text(slurm_conf(self.root, self.cpus, self.ctld_port, self.node_port))
        self._add_hosts_line()
        munge = self.root / "munge"
        self._daemon([_path("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={munge}/socket",
                      f"--pid-file={munge}/pid", f"--log-file={munge}/log", f"--seed-file={munge}/seed"], "munged")
        self._wait(lambda: (munge / "socket").exists(), 20, "munged did not create its socket")
        self._daemon([_path("slurmctld"), "-D", "-i", "-f", str(self.root / "slurm.conf")], "slurmctld")
        for node in NODES:
            self._daemon([_path("slurmd"), "-D", "-N", node, "-f", str(self.root / "slurm.conf")], f"slurmd {node}")
        self._wait(self._nodes_idle, 60, "the nodes did not become idle in sinfo")

    def _daemon(self, argv: list[str], name: str) -> None:
        log = open(self.root / "log" / f"{name.replace(' ', '.')}.stdout", "wb")
        parent = os.getpid()  # a daemon dies with the process that started it, even if that one is killed
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True,
                                           preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM)))
        self.procs[-1].name = name

    def _wait(self, ready, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            dead = [p.name for p in self.procs if p.poll() is not None]
            if dead:
                raise ClusterUnavailable(f"{dead[0]} exited (logs in {self.root / 'log'})")
            if ready():
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"{what} within {seconds:.0f} s (logs in {self.root / 'log'})")

    def _nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

    def _add_hosts_line(self) -> None:
        hosts = Path("/etc/hosts").read_text()
        if all(_resolves(n) for n in NODES):
            return
        try:
            with open("/etc/hosts", "a") as f:
                f.write(("" if hosts.endswith("\n") else "\n") + HOSTS_LINE)
        except OSError as err:
            raise ClusterUnavailable(f"the nodes n1 n2 do not resolve and /etc/hosts is not writable ({err})")
        self.added_hosts_line = True

    # -- use -----------------------------------------------------------------------------------------------------
    def run(self, *argv: str, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, squeue, scontrol ...) against this cluster."""
        return subprocess.run(list(argv), capture_output=True, text=True, env=kwargs.pop("env", self.env), **kwargs)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields.get("JobState", "UNKNOWN")

    def wait_job(self, job_id: str, timeout: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                             "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> str:
        """Polls until the job reaches one of `done`; returns that state (or raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in done:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout:.0f} s")

    def step_launched(self, job_id: str) -> bool:
        """Whether any slurmd launched a step of the job (its log's `launch task StepId=J.N`)."""
        logs = (self.root / "log").glob("slurmd.n*.log")
        return any(f"launch task StepId={job_id}." in path.read_text() for path in logs)

    # -- stop ----------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancels every job, stops the daemons started here (slurmd first) and removes the hosts line this cluster
        added."""
        if any(p.name == "slurmctld" and p.poll() is None for p in self.procs):
            self.run("scancel", "--partition=ci", "--full")  # the jobs' processes would outlive slurmd
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        if self.added_hosts_line:
            text = Path("/etc/hosts").read_text()
            Path("/etc/hosts").write_text(text.replace(HOSTS_LINE, "", 1))
            self.added_hosts_line = False


def _free_ports(count: int, above: int) -> int:
    """The first of `count` consecutive TCP ports above `above` free on localhost now."""
    import socket

    for base in range(above + 1, 30000):
        try:
            held = [socket.create_server(("127.0.0.1", base + i)) for i in range(count)]
        except OSError:
            continue
        for sock in held:
            sock.close()
        return base
    raise ClusterUnavailable(f"no {count} consecutive free ports between {above + 1} and 30000")


def _path(program: str) -> str:
    return shutil.which(program) or f"/usr/sbin/{program}"


def _resolves(host: str) -> bool:
    return subprocess.run(["getent", "hosts", host], capture_output=True).returncode == 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the daemons on SIGTERM as on Ctrl-C
    with SlurmCluster(sys.argv[1]) as cluster:
        print(f"export SLURM_CONF={cluster.env['SLURM_CONF']}   # Ctrl-C stops the cluster", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
