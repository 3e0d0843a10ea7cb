#!/usr/bin/env python
"""A real SLURM on this machine: slurmctld and two slurmd (two virtual nodes on one host).

    python tools/slurm_local.py start DIR   # prints the SLURM_CONF to export, then returns
    python tools/slurm_local.py stop DIR    # cancels its jobs and stops the daemons it started

For the real-SLURM tests (tests/test_slurm_real.py) and for trying `sbatch slurm/train_dit.sh` or
`tools/submit.py` by hand. Needs root (slurmd runs each job as its user) and Debian's `slurm-wlm`
and `munge`, installed with apt-get when missing. Everything lives in DIR: a private slurm.conf
(export SLURM_CONF), a private munge key and socket, state, spool and logs, on free ports. No system
file is written: not /etc/slurm or /etc/munge (private config and key) and not /etc/hosts: the node
names need not resolve, the launchers fall back to the node's address (NodeAddr=127.0.0.1). Only
the processes recorded in DIR/pids.json are stopped.

The set-up follows ../shared/design/PLATFORM.md ("A real SLURM on one machine"): no cgroups
(proctrack/linuxproc, task/none), no accounting (no sacct: submitit must read states elsewhere),
CPU-only nodes (no gres: the CPU route of the launchers), JobRequeue=1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

NODES = ("fdn1", "fdn2")   # not in /etc/hosts on purpose (see above)
DAEMONS = ("munged", "slurmctld", "slurmd")
START_BOUND_S = 180        # generous: a loaded 2-core machine; only a broken set-up takes longer


class SlurmSetupError(RuntimeError):
    """The local SLURM could not be installed or started; the message says why (one line)."""


def missing_programs() -> list[str]:
    return [p for p in (*DAEMONS, "sbatch", "srun", "scontrol", "squeue")
            if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt-get when they are missing (root only)."""
    if not missing_programs():
        return
    if os.geteuid() != 0:
        raise SlurmSetupError("slurm-wlm/munge are not installed and installing them needs root")
    if shutil.which("apt-get") is None:
        raise SlurmSetupError("slurm-wlm/munge are not installed and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # bounded: a machine without the registry must skip the tests, not hang on apt's retries
    for cmd, bound in ((["apt-get", "update", "-qq"], 300),
                       (["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], 600)):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=bound)
        except subprocess.TimeoutExpired:
            raise SlurmSetupError(f"{' '.join(cmd)} did not finish in {bound} s") from None
        if r.returncode != 0:
            last = (r.stderr.strip() or r.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise SlurmSetupError(f"{' '.join(cmd)} failed (exit {r.returncode}): {last[0]}")
    if missing_programs():
        raise SlurmSetupError(f"still missing after apt-get install: {missing_programs()}")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait(ready: Callable[[], bool], what: str, logs: Callable[[], str], bound: float,
          procs: list[subprocess.Popen] = ()) -> None:
    """Until ``ready()``; fail at once when one of ``procs`` has exited, or after ``bound``."""
    start = time.monotonic()
    while not ready():
        for p in procs:
            if p.poll() is not None:
                raise SlurmSetupError(f"{Path(p.args[0]).name} exited with {p.returncode} "
                                      f"(waiting for {what})\n{logs()}")
        if time.monotonic() - start > bound:
            raise SlurmSetupError(f"{what}: not after {bound:.0f} s\n{logs()}")
        time.sleep(0.2)


class LocalSlurm:
    """A private SLURM cluster in ``root``: ``start()``, run jobs with ``env``, ``stop()``."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = NODES, cpus: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.nodes = nodes
        self.cpus = cpus or max(2, os.cpu_count() or 2)   # per node (config_overrides: may exceed)
        self.conf = self.root / "slurm.conf"
        # munged wants every folder above its socket open to all (x), which a private temporary
        # folder (pytest's, mkdtemp's) is not: the socket gets a folder of its own in /tmp
        tag = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        self.munge_socket = Path(tempfile.gettempdir()) / f"framer-slurm-munge-{tag}" / "socket"
        self.pids_file = self.root / "pids.json"
        self._procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment for sbatch/srun/scontrol against this cluster."""
        path = os.environ.get("PATH", "")
        if "/usr/sbin" not in path.split(os.pathsep):
            path = f"{path}{os.pathsep}/usr/sbin"
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=path)

    # -- start --------------------------------------------------------------------------------

    def _write_config(self) -> None:
        host = socket.gethostname()
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        node_lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
            "State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        self.conf.write_text(f"""\
# written by tools/slurm_local.py: a private test cluster; see that file
ClusterName=framerlocal
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={r}/log/jobcomp.txt
# finished jobs stay visible to scontrol/squeue for an hour
MinJobAge=3600
# a preempted or requeued trainer's save is not cut short on a slow machine
KillWait=120
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")
        # own session: a signal to the caller's process group does not reach the daemons
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.env, start_new_session=True)
        log.close()
        self._procs.append(proc)
        self._record()
        return proc

    def _record(self) -> None:
        self.pids_file.write_text(json.dumps(
            [{"pid": p.pid, "cmd": p.args} for p in self._procs], indent=1))

    def logs(self) -> str:
        text = ""
        for f in sorted((self.root / "log").glob("*")):
            text += f"--- {f}\n{f.read_text(errors='replace')[-2000:]}\n"
        return text

    def start(self) -> "LocalSlurm":
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmSetupError("a local SLURM needs root (slurmd runs jobs as their user)")
        for d in ("state", "run", "log", "munge-key", *(f"spool/{n}" for n in self.nodes)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # munged checks permissions: the key private, the socket's folder open to all
        key_dir = self.root / "munge-key"
        key_dir.chmod(0o700)
        self.munge_socket.parent.mkdir(exist_ok=True)
        self.munge_socket.parent.chmod(0o755)
        key = key_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._write_config()
        try:
            self._spawn("munged", [_sbin("munged"), "--foreground", f"--socket={self.munge_socket}",
                                   f"--key-file={key}", f"--pid-file={key_dir}/munged.pid",
                                   f"--seed-file={key_dir}/munged.seed",
                                   f"--log-file={self.root}/log/munged.log"])
            _wait(self.munge_socket.exists, "munged's socket", self.logs, START_BOUND_S,
                  self._procs)
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i"])
            _wait(lambda: self._ok(["scontrol", "ping"]), "slurmctld to answer", self.logs,
                  START_BOUND_S, self._procs)
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", [_sbin("slurmd"), "-D", "-N", n])
            _wait(self.nodes_idle, f"nodes {','.join(self.nodes)} to be idle", self.logs,
                  START_BOUND_S, self._procs)
        except BaseException:
            self.stop()
            raise
        return self

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def nodes_idle(self) -> bool:
        """Every node of the cluster is idle: no job, no step still ending on it."""
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True,
                           text=True)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return r.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    # -- stop ---------------------------------------------------------------------------------

    def stop(self, bound: float = START_BOUND_S) -> None:
        """Cancel the cluster's jobs (their processes end through SLURM), then stop our daemons."""
        if any(p.poll() is None for p in self._procs if "slurmctld" in p.args[0]):
            jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True,
                                  text=True).stdout.split()
            if jobs:
                subprocess.run(["scancel", *jobs], env=self.env, capture_output=True)
                try:
                    _wait(lambda: not subprocess.run(
                        ["squeue", "-h", "-t", "PD,R,CG,S,CF,RQ,SE", "-o", "%i"], env=self.env,
                        capture_output=True, text=True).stdout.split(),
                        "the cancelled jobs to end", self.logs, bound)
                except SlurmSetupError as e:
                    print(f"slurm_local: {str(e).splitlines()[0]}", file=sys.stderr)
        # the nodes first (they talk to the controller on the way out), munge last
        for proc in reversed(self._procs):
            _terminate(proc.pid, proc.poll, bound)
            if proc.poll() is None:
                proc.wait()
        self._procs.clear()
        self._record()
        shutil.rmtree(self.munge_socket.parent, ignore_errors=True)


def _terminate(pid: int, exited: Callable[[], object], bound: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    start = time.monotonic()
    while exited() is None and time.monotonic() - start < bound:
        time.sleep(0.1)
    if exited() is None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------------------------
# command line: start leaves the daemons running; stop reads DIR/pids.json


def _stop_recorded(root: Path) -> None:
    cluster = LocalSlurm(root)
    if not cluster.pids_file.exists():
        raise SlurmSetupError(f"{cluster.pids_file} not found: nothing started in {root}")
    live = []
    for entry in json.loads(cluster.pids_file.read_text()):
        proc = Path(f"/proc/{entry['pid']}")
        try:  # only a process that still runs the recorded command with this cluster's config
            cmdline = [c.decode() for c in (proc / "cmdline").read_bytes().split(b"\0")[:-1]]
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline == entry["cmd"] and f"SLURM_CONF={cluster.conf}".encode() in environ:
            live.append(entry)
    ctld = [e for e in live if "slurmctld" in e["cmd"][0]]
    if ctld:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env, capture_output=True,
                              text=True).stdout.split()
        if jobs:
            subprocess.run(["scancel", *jobs], env=cluster.env, capture_output=True)
    for entry in reversed(live):
        pid = entry["pid"]
        _terminate(pid, lambda pid=pid: None if _alive(pid) else 0, START_BOUND_S)
    cluster.pids_file.write_text("[]")
    shutil.rmtree(cluster.munge_socket.parent, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="slurm_local.py", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["start", "stop"])
    p.add_argument("dir", type=Path, help="folder for the cluster's config, state and logs")
    args = p.parse_args(argv)
    try:
        if args.action == "start":
            args.dir.mkdir(parents=True, exist_ok=True)
            cluster = LocalSlurm(args.dir).start()
            print(f"export SLURM_CONF={cluster.conf}   # stop with: {sys.argv[0]} stop {args.dir}")
        else:
            _stop_recorded(args.dir)
    except SlurmSetupError as e:
        print(f"slurm_local: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
