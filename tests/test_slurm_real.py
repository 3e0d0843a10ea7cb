"""`sbatch slurm/train_dit.sh` and `tools/submit.py` against a real SLURM.

tools/slurm_local.py starts slurmctld and two slurmd on this machine: two virtual nodes (fdn1,
fdn2) without GPUs, without accounting, and with names that do not resolve. The real trainer runs
on them (configs/tiny_cpu_demo.toml, a few steps, 2 ranks over gloo). Every run must end
COMPLETED with every step in metrics.jsonl exactly once; a run that was stopped must resume from
its last checkpoint; the logs must say what happened (the script's own requeue, SLURM's requeue,
a cancel) and no rank may report a failure that did not happen.

A stopped run's first leg trains "for ever" (train.steps = 10**6), so the stop always finds it
training, however fast or slow the machine. While SLURM holds the requeued job (BeginTime, ~2 min)
the test sets train.steps to 3 past the saved step and releases it (`scontrol update StartTime=now`).

Opt-in: FRAMER_REAL_SLURM=1 (.ci/run sets it). Needs root and the package registry (slurm-wlm and
munge are installed when missing); without them every test here is skipped, saying why. The file
takes about 2 minutes on 2 cores (measured 111-119 s at load 1-1.5), plus the install on a fresh
machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _waiting import tail, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from slurm_local import LocalSlurm, SlurmSetupError, ensure_installed  # noqa: E402

OPT_IN = "FRAMER_REAL_SLURM"
FOREVER = 10**6
POLL_S = 0.5   # scontrol is a request to slurmctld: look a few times a second, not 50
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# pending for a reason that never clears by itself: fail at once instead of waiting for a hang
STUCK = {"PartitionConfig", "ReqNodeNotAvail", "PartitionNodeLimit", "PartitionTimeLimit",
         "BadConstraints", "InvalidQOS", "JobHeldAdmin", "JobHeldUser", "NodeDown"}

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> LocalSlurm:
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"real-SLURM tests are opt-in: set {OPT_IN}=1 (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("real-SLURM tests need root (slurmd runs the jobs; munge)")
    try:
        ensure_installed()
    except SlurmSetupError as e:
        pytest.skip(f"no SLURM to test against: {str(e).splitlines()[0]}")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield slurm
    slurm.stop()


# ----------------------------------------------------------------------------------------------
# helpers: config, SLURM state, logs


def _config(tmp: Path, steps: int, base: str = "tiny_cpu_demo.toml") -> Path:
    """configs/``base`` for this test: a few fast steps, no heatmaps/images/exports."""
    from framer_dist.config import dump_toml, load_config

    cfg = tmp / "run.toml"
    cfg.write_text(dump_toml(load_config(REPO / "configs" / base, [
        f'data.path="{REPO / "framer_dist" / "assets" / "photos"}"', f"train.steps={steps}",
        f'train.out_dir="{tmp / "run"}"', "checkpoint.every=0", "checkpoint.export=[]",
        "log.heatmap_every=0", "log.val_every=0", "log.progress=false"])))
    return cfg


def _set_steps(cfg: Path, steps: int) -> None:
    """The requeued run reads its config anew: make it stop 3 steps after the resume."""
    from framer_dist.config import dump_toml, load_config

    cfg.write_text(dump_toml(load_config(cfg, [f"train.steps={steps}"])))


def _job(slurm: LocalSlurm, job_id: str) -> dict[str, str]:
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm.env,
                       capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def _wait_state(slurm: LocalSlurm, job_id: str, want: set[str], details,
                settled: Callable[[dict[str, str]], bool] = lambda info: True) -> dict[str, str]:
    """Wait until the job is in one of ``want`` (and ``settled(info)``); fail at once if it ends
    otherwise or pends for a reason that never clears."""
    info: dict[str, str] = {}

    def ready() -> bool:
        info.update(_job(slurm, job_id))
        return info.get("JobState") in want and settled(info)

    def alive() -> bool:
        state = info.get("JobState")
        return state not in FINAL - want and not (state == "PENDING" and info.get("Reason") in STUCK)

    wait_until(ready, f"job {job_id} to be {'/'.join(sorted(want))}", alive=alive, poll=POLL_S,
               ended=f"job {job_id} went elsewhere", details=lambda: f"{info}\n{details()}")
    return info


def _steps_logged(out: Path) -> list[int]:
    f = out / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip()]


def _checkpoints(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")
                  if (p / "COMPLETE").exists())


def _wait_training(slurm: LocalSlurm, job_id: str, out: Path, details) -> None:
    def running() -> bool:
        return _job(slurm, job_id).get("JobState") in {"PENDING", "RUNNING"}

    wait_until(lambda: len(_steps_logged(out)) >= 3, f"job {job_id} to log 3 steps", alive=running,
               ended="the job ended before it could be stopped", details=details, poll=POLL_S)


def _release_resumed(slurm: LocalSlurm, job_id: str, cfg: Path, out: Path, details,
                     *update: str) -> int:
    """The stopped job is pending again: check what it saved, let it finish 3 steps later, release
    it now. Returns the saved step."""
    # a job requeued by its own batch script may pend with Reason=None until the scheduler's
    # next pass (seen in CI): wait for the reason to be set
    info = _wait_state(slurm, job_id, {"PENDING"}, details,
                       settled=lambda i: i.get("Reason") not in (None, "None"))
    assert info["Reason"] == "BeginTime", info  # SLURM's hold after any requeue
    # Released while the stopped run's steps still end on the nodes, or in the second its
    # credential was revoked, the batch launch is refused ("Job credential revoked", slurmd: "Job
    # N already killed"; seen in CI after the script's own requeue): SLURM's BeginTime hold is
    # there for that. Wait for idle nodes and a later second than the stop instead.
    wait_until(slurm.nodes_idle, "the nodes to be idle after the requeue", details=details,
               poll=POLL_S)
    seen = int(time.time())  # the requeue (and the revocation) happened in this second or before
    wait_until(lambda: int(time.time()) > seen, "the clock to pass the requeue's second",
               poll=POLL_S)
    saved = _checkpoints(out)
    assert saved and saved[-1] >= 3, (saved, details())
    assert _steps_logged(out) == list(range(1, saved[-1] + 1)), details()  # nothing after the save
    _set_steps(cfg, saved[-1] + 3)
    subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now", *update],
                   env=slurm.env, check=True)
    return saved[-1]


def _assert_ran_once(out: Path, steps: int, resumed_at: int | None, log: str) -> None:
    assert _steps_logged(out) == list(range(1, steps + 1)), log   # every step exactly once
    assert _checkpoints(out)[-1] == steps
    resumes = re.findall(r"resumed from \S+/step_(\d+) at step (\d+)", log)
    if resumed_at is None:
        assert not resumes, log
    else:  # every rank-0 resume was from the checkpoint the stop saved
        assert resumes and {(int(a), int(b)) for a, b in resumes} == {(resumed_at, resumed_at)}, log


def _assert_no_failure(log: str) -> None:
    """No launcher or trainer says something failed. torchrun's own traceback when SLURM signals
    it (SignalException: it was told to stop, and forwarded the signal) is the only one allowed."""
    for mark in ("training failed", "failed with exit code", "UncompletedJobError",
                 "RuntimeError", "framer-train: error", "Exited with exit code 255"):
        assert mark not in log, f"{mark!r} in the logs:\n{log[-6000:]}"
    for block in log.split("Traceback (most recent call last):")[1:]:
        raised = re.search(r"^[\w.]+(?:Error|Exception|Interrupt|Exit)\b.*$", block, re.M)
        assert raised and "SignalException: Process" in raised.group(0), \
            f"a traceback:\n{block[:3000]}"


def _read(paths: list[Path]) -> str:
    return "".join(f"--- {p}\n{p.read_text(errors='replace')}\n" for p in paths if p.is_file())


# ----------------------------------------------------------------------------------------------
# sbatch slurm/train_dit.sh


class Batch:
    """One `sbatch slurm/train_dit.sh` job on the local cluster, with its logs."""

    def __init__(self, slurm: LocalSlurm, tmp: Path, steps: int, *sbatch_args: str,
                 config: str = "tiny_cpu_demo.toml") -> None:
        from _ranks import free_port

        self.slurm, self.tmp = slurm, tmp
        self.cfg, self.out, self.logs = _config(tmp, steps, config), tmp / "run", tmp / "logs"
        # the CPU route: no GPU gres on these nodes, so no GPU request (docs/launch.md)
        env = dict(slurm.env, CONFIG=str(self.cfg), PYTHON=sys.executable, LOG_DIR=str(self.logs),
                   PYTHONPATH=str(REPO), RDZV_PORT=str(free_port()), OMP_NUM_THREADS="1")
        env.pop("GPUS_PER_NODE", None)
        r = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0",
                            f"--output={tmp}/batch-%j.out", *sbatch_args, "slurm/train_dit.sh"],
                           cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        self.id = r.stdout.strip().split(";")[0]

    def batch_log(self) -> str:
        return _read([self.tmp / f"batch-{self.id}.out"])

    def node_logs(self) -> str:
        return _read(sorted(self.logs.rglob("node*.log")))

    def details(self) -> str:
        return tail([self.tmp / f"batch-{self.id}.out", *sorted(self.logs.rglob("node*.log"))])

    def exit_codes(self, restart: int) -> list[str]:
        d = self.logs / f"framer-dit-{self.id}" / f"restart{restart}" / "exit"
        return [p.read_text().strip() for p in sorted(d.glob("rank*.code"))]


def test_sbatch_trains_on_two_cpu_nodes(cluster, tmp_path) -> None:
    job = Batch(cluster, tmp_path, 5)
    _wait_state(cluster, job.id, {"COMPLETED"}, job.details)
    log = job.batch_log()
    # one CPU worker per node (no GPU allocated), every CPU of the node for it; the first node's
    # name does not resolve here, so the rendezvous is its address
    assert "2 node(s) x 1 worker(s) (no GPU(s) allocated per node" in log, log
    assert f"{cluster.cpus} CPU(s) per node" in log and "rendezvous 127.0.0.1:" in log, log
    assert job.exit_codes(0) == ["0", "0"]
    _assert_ran_once(job.out, 5, None, job.node_logs())
    _assert_no_failure(log + job.node_logs())


def test_sbatch_scontrol_requeue_resumes(cluster, tmp_path) -> None:
    """On the pisasr family (FRAMER_U's tiny U-Net; the other sbatch tests run dit4sr): the
    launcher and the requeue do not depend on the family."""
    job = Batch(cluster, tmp_path, FOREVER, config="tiny_pisasr_cpu.toml")
    _wait_training(cluster, job.id, job.out, job.details)
    subprocess.run(["scontrol", "requeue", job.id], env=cluster.env, check=True)
    saved = _release_resumed(cluster, job.id, job.cfg, job.out, job.details)
    info = _wait_state(cluster, job.id, {"COMPLETED"}, job.details)
    assert info["Restarts"] == "1"
    log = job.batch_log()
    assert "checkpoint saved; SLURM requeued the job (scontrol requeue or preemption)" in log, log
    assert "cancelled" not in log and "after preemption signal" not in log, log  # SLURM did it
    assert job.exit_codes(0) == ["75", "75"] and job.exit_codes(1) == ["0", "0"]
    _assert_ran_once(job.out, saved + 3, saved, job.node_logs())
    _assert_no_failure(log + job.node_logs())


def test_sbatch_scancel_saves_and_is_not_requeued(cluster, tmp_path) -> None:
    job = Batch(cluster, tmp_path, FOREVER)
    _wait_training(cluster, job.id, job.out, job.details)
    subprocess.run(["scancel", job.id], env=cluster.env, check=True)
    info = _wait_state(cluster, job.id, {"CANCELLED"}, job.details)
    # the batch shell gets SIGTERM with the steps, then KillWait: wait for its last word
    wait_until(lambda: "[train_dit] checkpoint saved" in job.batch_log(), "the script's verdict",
               details=job.details, poll=POLL_S)
    log = job.batch_log()
    assert "checkpoint saved; job was cancelled, not requeueing" in log, log
    assert info["Restarts"] == "0" and "requeue" not in log.replace("not requeueing", ""), log
    assert job.exit_codes(0) == ["75", "75"]
    saved = _checkpoints(job.out)
    assert saved and _steps_logged(job.out) == list(range(1, saved[-1] + 1))
    _assert_no_failure(log + job.node_logs())


def test_sbatch_time_limit_signal_saves_and_requeues(cluster, tmp_path) -> None:
    """The script's own `--signal=USR1@300` before a short time limit. The limit is set once the
    trainer runs (10 min at submission, then what leaves at most 5 min): the signal cannot come
    before the trainer handles it, however slow the start, and comes within about a minute."""
    job = Batch(cluster, tmp_path, FOREVER, "--time=10")
    _wait_training(cluster, job.id, job.out, job.details)
    run_s = _seconds(_job(cluster, job.id)["RunTime"])
    subprocess.run(["scontrol", "update", f"jobid={job.id}",
                    f"TimeLimit={math.ceil(run_s / 60) + 4}"], env=cluster.env, check=True)
    # the requeued run gets a long limit back, so that it is not signalled again
    saved = _release_resumed(cluster, job.id, job.cfg, job.out, job.details, "TimeLimit=30")
    _wait_state(cluster, job.id, {"COMPLETED"}, job.details)
    log = job.batch_log()
    assert f"checkpoint saved after preemption signal: scontrol requeue {job.id}" in log, log
    assert "cancelled" not in log and "SLURM requeued" not in log, log
    assert job.exit_codes(0) == ["75", "75"] and job.exit_codes(1) == ["0", "0"]
    _assert_ran_once(job.out, saved + 3, saved, job.node_logs())
    _assert_no_failure(log + job.node_logs())


def _seconds(runtime: str) -> int:
    """scontrol's RunTime, [D-]HH:MM:SS."""
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


# ----------------------------------------------------------------------------------------------
# tools/submit.py (submitit's SLURM executor)


class Submitted:
    """One `tools/submit.py` job on the local cluster (2 ranks: 2 nodes x 1, or 1 node x 2)."""

    def __init__(self, slurm: LocalSlurm, tmp: Path, steps: int, monkeypatch, *args: str) -> None:
        self.slurm, self.tmp = slurm, tmp
        self.cfg, self.out, self.folder = _config(tmp, steps), tmp / "run", tmp / "submitit"
        for k, v in slurm.env.items():  # for the watcher's squeue in this process
            monkeypatch.setenv(k, v)
        env = dict(slurm.env, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "tools/submit.py", "--config", str(self.cfg),
                            "--gpus-per-node", "0", "--time", "30", "--folder", str(self.folder),
                            *args], cwd=REPO, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        self.id = re.search(r"submitted job (\d+)", r.stdout).group(1)

    def job(self):
        from framer_dist import launch

        return launch._SlurmJob(folder=self.folder, job_id=self.id, tasks=[0, 1])

    def logs(self) -> str:
        return _read(sorted(self.folder.glob(f"{self.id}_*_log.*")))

    def details(self) -> str:
        return tail(sorted(self.folder.glob(f"{self.id}_*_log.*")))


def _check_submitit_done(sub: Submitted, attempt: int) -> None:
    job = sub.job()
    wait_until(job.done, f"submitit job {sub.id} to be done", details=sub.details, poll=POLL_S)
    # read from squeue: this cluster has no accounting (sacct), where submitit said UNKNOWN
    assert job.state == "COMPLETED", (job.state, sub.details())
    assert [(r["exit_code"], r["attempt"]) for r in job.results()] == [(0, attempt)] * 2


def test_submitit_trains_on_two_cpu_nodes(cluster, tmp_path, monkeypatch) -> None:
    sub = Submitted(cluster, tmp_path, 5, monkeypatch, "--nodes", "2")
    _wait_state(cluster, sub.id, {"COMPLETED"}, sub.details)
    _check_submitit_done(sub, 0)
    _assert_ran_once(sub.out, 5, None, sub.logs())
    _assert_no_failure(sub.logs())


def test_submitit_scontrol_requeue_resumes(cluster, tmp_path, monkeypatch) -> None:
    """SLURM's own requeue (scontrol requeue, or preemption with PreemptMode=REQUEUE): SIGTERM to
    the tasks; the trainers save, the tasks say SLURM requeued the job and exit."""
    sub = Submitted(cluster, tmp_path, FOREVER, monkeypatch, "--nodes", "2")
    _wait_training(cluster, sub.id, sub.out, sub.details)
    subprocess.run(["scontrol", "requeue", sub.id], env=cluster.env, check=True)
    saved = _release_resumed(cluster, sub.id, sub.cfg, sub.out, sub.details)
    _wait_state(cluster, sub.id, {"COMPLETED"}, sub.details)
    _check_submitit_done(sub, 0)   # the same submission ran again
    logs = sub.logs()
    assert logs.count("SLURM requeued the job (scontrol requeue or preemption)") == 2, logs
    assert "(SLURM restart 1)" in logs
    _assert_ran_once(sub.out, saved + 3, saved, logs)
    _assert_no_failure(logs)


def test_submitit_preemption_signal_requeues_through_checkpoint(cluster, tmp_path,
                                                                monkeypatch) -> None:
    """submitit's preemption: USR2 to every task, as `--signal` sends it before the time limit
    (the time-limit path itself is tested once, on sbatch above). 1 node x 2 tasks: rank 0
    requeues (`scontrol requeue`) as soon as its own trainer has exited, and SLURM then SIGTERMs
    rank 1 while its trainer may still be exiting: no rank may report a failure."""
    sub = Submitted(cluster, tmp_path, FOREVER, monkeypatch, "--nodes", "1", "--tasks", "2")
    _wait_training(cluster, sub.id, sub.out, sub.details)
    subprocess.run(["scancel", "--signal=USR2", sub.id], env=cluster.env, check=True)
    saved = _release_resumed(cluster, sub.id, sub.cfg, sub.out, sub.details)
    _wait_state(cluster, sub.id, {"COMPLETED"}, sub.details)
    _check_submitit_done(sub, 1)   # requeued through TrainJob.checkpoint
    logs = sub.logs()
    assert "task 0: requeue requested (attempt 1 resumes" in logs, logs
    assert logs.count("trainer saved and exited for requeue") == 2, logs
    _assert_ran_once(sub.out, saved + 3, saved, logs)
    _assert_no_failure(logs)
