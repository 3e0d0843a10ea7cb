"""Cluster launch: slurm/*.sh lint, the sbatch script under a fake SLURM, submitit jobs.

The distributed tests run the real trainer (tiny model, fp32, 2 ranks over gloo) through the real
launchers: `slurm/train_dit.sh` -> fake srun -> torchrun (c10d) -> slurm/worker.sh -> trainer, and
submitit's LocalExecutor -> framer_dist.launch.TrainJob -> trainer. Preemption is simulated the way
SLURM does it: the signal goes to the job step's processes (fake scancel) or to submitit's task
processes; the batch shell / controller is not signalled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from framer_dist import launch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _waiting import HANG_S, POLL_S, Hang, tail, wait_exit, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FAKE_SLURM = REPO / "tests" / "fake_slurm"
SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + sorted(p for p in FAKE_SLURM.iterdir() if p.is_file())
STEPS = 24
TINY_TOML = """
[model]
preset = "tiny"
[data]
source = "synthetic"
resolution = 32
scale = 4
batch_size = 2
[train]
mode = "control"
global_batch_size = 4        # 2 ranks x 2, or 1 rank x 2 x 2 accumulation after a resize
steps = {steps}
lr = 1e-3
precision = "fp32"
device = "cpu"
seed = 3
out_dir = "{out}"
[checkpoint]
every = 0
keep_last = 3
[log]
every = 4
heatmap_every = 0
progress = false
"""


def _write_config(tmp: Path, out: Path, steps: int = STEPS) -> Path:
    cfg = tmp / "tiny.toml"
    cfg.write_text(TINY_TOML.format(steps=steps, out=out))
    return cfg


def _shellcheck() -> str | None:
    venv_bin = Path(sys.executable).parent / "shellcheck"
    return str(venv_bin) if venv_bin.exists() else shutil.which("shellcheck")


def _steps_logged(out: Path) -> list[int]:
    f = out / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line)["step"] for line in f.read_text().splitlines() if line.strip()]


def _wait_for_steps(out: Path, n: int, proc_alive, details=None) -> None:
    wait_until(lambda: len(_steps_logged(out)) >= n, f"{n} steps logged in {out}", alive=proc_alive,
               ended="the run ended before it could be preempted", details=details)


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")
                  if (p / "COMPLETE").exists())


def _load_state(out: Path, step: int, tmp: Path) -> dict:
    """Model + optimizer tensors of a DCP checkpoint, flattened."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dst = tmp / f"flat_{out.name}_{step}.pt"
    dcp_to_torch_save(out / "checkpoints" / f"step_{step:08d}" / "dcp", dst)
    flat: dict = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + str(k)] = v

    walk(torch.load(dst, weights_only=False), "")
    return flat


def _assert_same_state(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    n_tensors = 0
    for k in a:
        if isinstance(a[k], torch.Tensor):
            n_tensors += 1
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            assert a[k] == b[k], f"{k}: {a[k]} != {b[k]}"
    assert n_tensors > 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# static checks and argument handling (fast)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_shellcheck_clean(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck is not installed")
    r = subprocess.run([sc, "-x", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sbatch_header_requeues_and_signals_early() -> None:
    text = (REPO / "slurm" / "train_dit.sh").read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in header
    assert "#SBATCH --gpus-per-node=8" in header
    sig = [ln for ln in header if ln.startswith("#SBATCH --signal=")]
    assert len(sig) == 1 and not sig[0].split("=", 1)[1].startswith("B:")  # the steps, not the shell
    assert int(sig[0].rsplit("@", 1)[1]) >= 120


def test_submit_without_config_fails_before_queueing(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "submitit"
    with pytest.raises(SystemExit) as e:
        launch.main(["--local", "--cpu", "--tasks", "2", "--folder", str(folder)])
    assert e.value.code == 2
    assert "--config" in capsys.readouterr().err
    assert not folder.exists()


@pytest.mark.parametrize("argv, message", [
    (["--config", "nope.toml"], "config file not found: nope.toml"),
    (["--config", "{cfg}", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["--config", "{cfg}", "--backend", "deepspeed"], "needs --ds"),
    (["--config", "{cfg}", "--ds", "missing.json"], "DeepSpeed config not found: missing.json"),
    (["--config", "{cfg}", "--nodes", "2"], "--nodes must be 1"),
    (["--config", "{cfg}", "checkpoint.preempt_signal=SIGUSR1"], "set by the launcher"),
    (["--config", "{cfg}", 'data.source="folder"', 'data.path="no/such/photos"'], "data.path"),
    (["--config", "{cfg}", "--tasks", "3"], "train.global_batch_size"),  # 4 is not 2 x 3 x k
])
def test_submit_bad_options_fail_before_queueing(tmp_path: Path, capsys, argv, message) -> None:
    cfg = _write_config(tmp_path, tmp_path / "run")
    folder = tmp_path / "submitit"
    argv = [a.replace("{cfg}", str(cfg)) for a in argv]
    with pytest.raises(SystemExit) as e:
        launch.main([*argv, "--local", "--cpu", "--folder", str(folder)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not folder.exists()


def test_submit_resubmission_over_checkpoints_is_valid(tmp_path: Path, capsys) -> None:
    """The launcher always resumes (--resume auto): an out_dir with checkpoints is no error."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    (out / "checkpoints" / "step_00000002" / "COMPLETE").write_text("{}")
    cfg = _write_config(tmp_path, out)
    assert launch.main(["--config", str(cfg), "--local", "--cpu", "--dry-run"]) == 0
    assert "--resume auto" in capsys.readouterr().out


def test_slurm_plan_maps_every_option(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")  # submitit wants srun
    cfg = _write_config(tmp_path, tmp_path / "run")
    folder = tmp_path / "submitit"
    rc = launch.main(["--config", str(cfg), "--nodes", "4", "--gpus-per-node", "8",
                      "--partition", "gpu", "--account", "proj", "--qos", "high",
                      "--constraint", "h200", "--mem", "0", "--time", "1-00:00:00",
                      "--cpus-per-task", "12", "--folder", str(folder), "--dry-run",
                      "train.global_batch_size=64", "framer.weight=0.05"])  # 64 = 2 x 32 ranks
    assert rc == 0
    out = capsys.readouterr().out
    for line in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
                 "--account=proj", "--qos=high", "--constraint=h200", "--mem=0", "--time=1440",
                 "--cpus-per-task=12", "--requeue", "--signal=USR2@300"]:
        assert f"#SBATCH {line}\n" in out, line
    assert "srun --unbuffered" in out and "--kill-on-bad-exit=1" in out
    assert "--resume auto checkpoint.preempt_signal=SIGUSR2" in out
    assert out.rstrip().endswith("framer.weight=0.05")
    assert not folder.exists()  # a dry run queues nothing

    with pytest.raises(SystemExit):
        launch.main(["--config", str(cfg), "--time", "4", "--signal-delay", "300", "--dry-run"])
    assert "--signal-delay 300s is not shorter than --time" in capsys.readouterr().err


def test_slurm_plan_accepts_a_cpu_partition(tmp_path: Path, monkeypatch, capsys) -> None:
    """--gpus-per-node 0: no GPU request at all (a cluster without GPU gres refuses even
    --gpus-per-node=0), --tasks ranks per node."""
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    cfg = _write_config(tmp_path, tmp_path / "run")
    assert launch.main(["--config", str(cfg), "--nodes", "2", "--gpus-per-node", "0", "--tasks",
                        "2", "--time", "30", "--dry-run", "train.global_batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2\n" in out and "#SBATCH --ntasks-per-node=2\n" in out
    assert "gpus" not in out and "gres" not in out
    assert launch.main(["--config", str(cfg), "--nodes", "2", "--gpus-per-node", "0", "--time",
                        "30", "--dry-run"]) == 0
    assert "#SBATCH --ntasks-per-node=1\n" in capsys.readouterr().out   # default: 1 per node
    with pytest.raises(SystemExit):
        launch.main(["--config", str(cfg), "--gpus-per-node", "8", "--tasks", "2", "--dry-run"])
    assert "one task per GPU" in capsys.readouterr().err


def test_slurm_job_state_without_accounting(tmp_path: Path, monkeypatch) -> None:
    """No accounting: sacct fails ('accounting storage is disabled'); the state comes from squeue
    (submitit alone says UNKNOWN for ever)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "jobstate.4242").write_text("COMPLETED")
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state))
    cfg = _write_config(tmp_path, tmp_path / "run")
    args = launch.build_parser().parse_args(["--config", str(cfg), "--gpus-per-node", "2",
                                             "--time", "30", "--folder", str(tmp_path / "sub")])
    ex = launch.make_executor(launch.plan_submission(args))
    job = ex._executor.job_class(folder=tmp_path / "sub", job_id="4242", tasks=[0])
    assert job.state == "COMPLETED" and job.done()


def _slurm_task_env(tmp: Path, rank: int, nodelist: str = "localhost") -> dict[str, str]:
    """A submitit task's environment under SLURM (1 node x 2 tasks), against the fake SLURM."""
    env = dict(os.environ, PATH=f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}",
               FAKE_SLURM_STATE=str(tmp / "state"), SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="77",
               SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="2",
               SLURM_NODEID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               PYTHONPATH=str(REPO), STANDIN_DIR=str(tmp))
    env.pop("SLURM_RESTART_COUNT", None)
    return env


def test_slurm_task_rendezvous_on_the_node_address(tmp_path: Path, monkeypatch) -> None:
    """The first node's name does not resolve: the trainers meet on its NodeAddr."""
    for k, v in _slurm_task_env(tmp_path, 0, "fdn-does-not-resolve[1-2]").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FAKE_SLURM_NODE_ADDR", "127.0.0.1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    spec = launch.TrainSpec(config="c.toml", backend_args=[], overrides=[], workdir=str(tmp_path))
    assert launch.TrainJob(spec)._child_env()["MASTER_ADDR"] == "127.0.0.1"
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
    assert launch.TrainJob(spec)._child_env()["MASTER_ADDR"] == "localhost"  # resolves: kept


# A submitit task (TrainJob) under SLURM's environment, with a stand-in trainer: "term" saves on
# SIGTERM and exits with the requeue code; "exiting" saves on USR2 and then, on its way out, no
# longer handles SIGTERM (a trainer killed by the SIGTERM that a requeue sends).
SLURM_TASK = """
import sys
from framer_dist.launch import TrainJob, TrainSpec
TrainJob(TrainSpec(config="c.toml", backend_args=[], overrides=[], workdir=sys.argv[1],
                   python=sys.argv[2]))()
"""
STANDIN_TASK_TRAINER = """#!{python}
import os, signal, sys, time
got = []
mode = os.environ["STANDIN_MODE"]
signal.signal(signal.SIGTERM if mode == "term" else signal.SIGUSR2, lambda n, f: got.append(n))
open(os.path.join(os.environ["STANDIN_DIR"], "ready." + os.environ["RANK"]), "w").close()
while not got:
    time.sleep(0.05)
if mode == "term":
    sys.exit(75)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
open(os.path.join(os.environ["STANDIN_DIR"], "saved." + os.environ["RANK"]), "w").close()
time.sleep(600)
"""


def _run_slurm_task(tmp: Path, rank: int, mode: str, signals: list[tuple[int, str]],
                    restarts: int) -> tuple[int, str]:
    """Start the task, send each (signal, after this file exists), return its exit code and log."""
    (tmp / "state").mkdir(exist_ok=True)
    (tmp / "state" / "restarts.77").write_text(str(restarts))
    trainer = tmp / "trainer"
    trainer.write_text(STANDIN_TASK_TRAINER.format(python=sys.executable))
    trainer.chmod(0o755)
    log = tmp / f"task{rank}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", SLURM_TASK, str(tmp), str(trainer)],
                                env=dict(_slurm_task_env(tmp, rank), STANDIN_MODE=mode),
                                stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        for sig, after in signals:
            wait_until((tmp / after).exists, f"{after} from the stand-in trainer",
                       alive=lambda: proc.poll() is None, ended="the task ended first",
                       details=lambda: tail([log]))
            proc.send_signal(sig)
        rc = wait_exit(proc, "the task to exit", details=lambda: tail([log]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, log.read_text()


def test_slurm_task_says_slurm_requeued_the_job(tmp_path: Path) -> None:
    """`scontrol requeue` (SLURM raises Restarts at once): the tasks get SIGTERM, the trainer
    saves; the task says SLURM requeued the job and exits 0 (it raised UncompletedJobError)."""
    rc, log = _run_slurm_task(tmp_path, 1, "term", [(signal.SIGTERM, "ready.1")], restarts=1)
    assert rc == 0, log
    assert "SLURM requeued the job (scontrol requeue or preemption)" in log, log
    assert "UncompletedJobError" not in log


def test_slurm_task_after_scancel_is_not_requeued(tmp_path: Path) -> None:
    rc, log = _run_slurm_task(tmp_path, 1, "term", [(signal.SIGTERM, "ready.1")], restarts=0)
    assert rc != 0
    assert "UncompletedJobError: rank 1: stopped by SIGTERM (scancel)" in log, log


def test_slurm_task_whose_trainer_a_requeue_kills_while_exiting_reports_no_failure(
        tmp_path: Path) -> None:
    """Rank 1 after the preemption signal: its trainer has saved and is exiting when rank 0's
    requeue makes SLURM SIGTERM it (-15). Not a failure (it was: RuntimeError ... exit code -15)."""
    rc, log = _run_slurm_task(tmp_path, 1, "exiting", [(signal.SIGUSR2, "ready.1"),
                                                        (signal.SIGTERM, "saved.1")], restarts=1)
    assert rc == 0, log
    assert "task 1: trainer stopped by signal 15 after the preemption signal" in log, log
    assert "failed" not in log


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30:00", 90), ("10:30", 11),
                                           ("2-00:00:00", 2880), ("1-6", 1800)])
def test_time_parsing(text: str, minutes: int) -> None:
    assert launch.parse_time_minutes(text) == minutes


def test_batch_script_refuses_a_missing_config(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}",
               FAKE_SLURM_STATE=str(tmp_path / "state"), LOG_DIR=str(tmp_path / "logs"))
    env.pop("CONFIG", None)
    out = tmp_path / "batch.out"
    r = subprocess.run(["sbatch", f"--output={out}", "slurm/train_dit.sh"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 2
    assert "CONFIG is not set" in out.read_text()
    assert not (tmp_path / "state" / "steps.0").exists() and not list((tmp_path / "state").glob("steps.*"))


# ----------------------------------------------------------------------------------------------
# waiting for a job: on its state, however slow the machine; only a hang reaches the bound


def test_wait_job_polls_the_state_until_done() -> None:
    looks = []

    class Job:
        job_id = "1"

        def done(self) -> bool:
            looks.append(time.monotonic())
            return len(looks) == 4

    _wait_job(Job(), bound=60, poll=0)
    assert len(looks) == 4  # returned at the first look that saw the job done


def test_wait_job_at_its_bound_cancels_and_shows_the_logs(tmp_path: Path) -> None:
    """A real submitit job that would run for 10 minutes, waited on with a 1 s bound: the failure
    names the job and carries every task's log; the job is cancelled (it ends right after)."""
    import submitit

    ex = submitit.LocalExecutor(folder=tmp_path)
    ex.update_parameters(tasks_per_node=2, timeout_min=30)
    job = ex.submit(time.sleep, 600)
    tasks = _task_processes(job)
    outs = [job.task(k).paths.stdout for k in range(2)]
    wait_until(lambda: all(p.is_file() and "Starting with" in p.read_text() for p in outs),
               "both tasks to log their start")
    with pytest.raises(Hang) as e:
        _wait_job(job, bound=1)
    msg = str(e.value)
    assert f"submitit job {job.job_id} to finish: not after 1 s" in msg and "only a hang" in msg
    for k in range(2):
        assert f"{job.job_id}_{k}_log.out" in msg and f"{job.job_id}_{k}_log.err" in msg
    assert "Starting with JobEnvironment" in msg  # the log text itself, not only its name
    _wait_job(job)  # the cancelled job ends
    wait_until(lambda: not any(p.is_running() for p in tasks), "the cancelled job's tasks to exit")


# ----------------------------------------------------------------------------------------------
# end to end (real trainer, 2 ranks over gloo)


def _submit_local(tmp: Path, cfg: Path, folder: Path, tasks: int, *extra: str):
    args = launch.build_parser().parse_args(
        ["--config", str(cfg), "--local", "--cpu", "--tasks", str(tasks), "--folder", str(folder),
         *extra])
    return launch.submit(launch.plan_submission(args))


def _task_processes(job) -> list[psutil.Process]:
    """submitit's task processes: the children of the local controller (not the trainers)."""
    controller = psutil.Process(job._process.pid)
    wait_until(lambda: bool(controller.children()), "submitit's task processes",
               alive=lambda: job._process.poll() is None, ended="the submitit controller exited",
               details=lambda: _job_logs(job), on_hang=job.cancel)
    return controller.children()


def _job_logs(job) -> str:
    """The end of every task's stdout and stderr (submitit's log files)."""
    paths = [job.task(k).paths for k in range(job.num_tasks)]
    return f"submitit job {job.job_id}, state {job.state}\n" + tail(
        [f for p in paths for f in (p.stdout, p.stderr)])


def _wait_job(job, bound: float = HANG_S, poll: float = POLL_S) -> None:
    """Wait until the job is no longer running (its controller process ended), however long a slow
    machine takes; only a hang reaches ``bound``: then the job is cancelled and the failure shows
    every task's log."""
    wait_until(job.done, f"submitit job {job.job_id} to finish", details=lambda: _job_logs(job),
               bound=bound, poll=poll, on_hang=lambda: job.cancel())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[str], dict]:
    """An uninterrupted 2-task submitit run: its step log and final state."""
    tmp = tmp_path_factory.mktemp("ref")
    out = tmp / "run"
    job = _submit_local(tmp, _write_config(tmp, out), tmp / "submitit", 2, "--time", "30")
    _wait_job(job)  # cancels the job if it hangs
    results = job.results()
    assert [r["exit_code"] for r in results] == [0, 0] and results[0]["attempt"] == 0
    assert _steps_logged(out) == list(range(1, STEPS + 1))
    assert _checkpoint_steps(out)[-1] == STEPS
    return out, (out / "metrics.jsonl").read_text().splitlines(), _load_state(out, STEPS, tmp)


@pytest.mark.distributed
@pytest.mark.slow
def test_submitit_local_preemption_requeues_and_matches_uninterrupted(tmp_path, reference) -> None:
    _, ref_rows, ref_state = reference
    out = tmp_path / "run"
    folder = tmp_path / "submitit"
    job = _submit_local(tmp_path, _write_config(tmp_path, out), folder, 2, "--time", "30")
    try:
        tasks = _task_processes(job)
        _wait_for_steps(out, 3, lambda: not job.done(), details=lambda: _job_logs(job))
        for p in tasks:  # SLURM signals every task of the job; so does the local controller
            p.send_signal(signal.SIGUSR2)
        _wait_job(job)
    finally:
        if not job.done():
            job.cancel()

    results = job.results()
    assert [r["exit_code"] for r in results] == [0, 0]
    assert results[0]["attempt"] == 1, "the job was not requeued through TrainJob.checkpoint"
    ckpts = _checkpoint_steps(out)
    assert len(ckpts) == 2 and 3 <= ckpts[0] < STEPS and ckpts[1] == STEPS, ckpts
    # every step exactly once across the two attempts, with the reference run's losses
    assert _steps_logged(out) == list(range(1, STEPS + 1))
    assert (out / "metrics.jsonl").read_text().splitlines() == ref_rows
    _assert_same_state(_load_state(out, STEPS, tmp_path), ref_state)
    log0 = (folder / f"{job.job_id}_0_log.out").read_text()
    assert "trainer saved and exited for requeue" in log0 and "attempt 1" in log0


@pytest.mark.distributed
@pytest.mark.slow
def test_submitit_resubmit_with_other_task_count_resumes_same_checkpoint(tmp_path, reference) -> None:
    """The reference run's 2-rank checkpoint, resubmitted as a 1-task job, is where it goes on."""
    ref_out, _, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    cfg = _write_config(tmp_path, out, steps=STEPS + 3)
    folder = tmp_path / "submitit"
    job = _submit_local(tmp_path, cfg, folder, 1, "--time", "30")
    _wait_job(job)  # cancels the job if it hangs
    (result,) = job.results()
    assert result["exit_code"] == 0
    assert _steps_logged(out) == list(range(1, STEPS + 4))
    assert _checkpoint_steps(out)[-2:] == [STEPS, STEPS + 3]
    meta = json.loads((out / "checkpoints" / f"step_{STEPS + 3:08d}" / "backend_meta.json").read_text())
    assert meta["world_size"] == 1
    log = (folder / f"{job.job_id}_0_log.err").read_text() + (folder / f"{job.job_id}_0_log.out").read_text()
    assert f"step_{STEPS:08d} at step {STEPS}" in log


@pytest.mark.distributed
@pytest.mark.slow
def test_sbatch_script_trains_preempts_and_requeues_under_fake_slurm(tmp_path, reference) -> None:
    _, ref_rows, ref_state = reference
    out = tmp_path / "run"
    cfg = _write_config(tmp_path, out)
    state, logs = tmp_path / "state", tmp_path / "logs"
    job_id = "4242"
    env = dict(os.environ, PATH=f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}",
               FAKE_SLURM_STATE=str(state), FAKE_SLURM_JOB_ID=job_id, CONFIG=str(cfg),
               PYTHON=sys.executable, GPUS_PER_NODE="1", LOG_DIR=str(logs),
               RDZV_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    batch_out = tmp_path / "batch-%j.out"
    # 2 nodes x 1 GPU: two srun tasks, each a torchrun agent, one c10d rendezvous -> 2 ranks
    proc = subprocess.Popen(["sbatch", "--nodes=2", f"--output={batch_out}", "slurm/train_dit.sh"],
                            cwd=REPO, env=env)

    def job_logs() -> str:
        return tail(sorted(tmp_path.glob("batch-*.out")) + sorted(logs.rglob("*.log")))

    try:
        _wait_for_steps(out, 3, lambda: proc.poll() is None, details=job_logs)
        subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True)
        assert wait_exit(proc, "the requeued fake-SLURM job to end", details=job_logs) == 0, job_logs()
    finally:
        _stop_fake_job(proc, env, job_id)
    batch_log = (tmp_path / f"batch-{job_id}.out").read_text()
    assert (state / "requeued").read_text().split() == [job_id], batch_log
    assert "scontrol requeue 4242" in batch_log
    restart0 = logs / f"framer-dit-{job_id}" / "restart0"
    restart1 = logs / f"framer-dit-{job_id}" / "restart1"
    assert sorted(p.name for p in restart0.glob("node*.log")) == ["node0.log", "node1.log"]
    assert {p.read_text().strip() for p in (restart0 / "exit").glob("rank*.code")} == {"75"}
    assert sorted(p.name for p in (restart1 / "exit").glob("rank*.code")) == ["rank0.code", "rank1.code"]
    assert {p.read_text().strip() for p in (restart1 / "exit").glob("rank*.code")} == {"0"}
    ckpts = _checkpoint_steps(out)
    assert len(ckpts) == 2 and 3 <= ckpts[0] < STEPS and ckpts[1] == STEPS, ckpts
    # torchrun/c10d ranks train exactly like submitit's: same losses, same final state
    assert (out / "metrics.jsonl").read_text().splitlines() == ref_rows
    _assert_same_state(_load_state(out, STEPS, tmp_path), ref_state)


# what a launcher's requeue does to a rank still on its way out after its save: SIGTERM (submitit's
# rank 0 runs `scontrol requeue` as soon as its own trainer has exited; SLURM then signals the rest)
SIGTERM_AFTER_MAIN = """
import os, signal, sys
from framer_dist.train import main
rc = main(sys.argv[1:])
os.kill(os.getpid(), signal.SIGTERM)
sys.exit(rc)
"""


def test_trainer_exiting_for_requeue_survives_sigterm(tmp_path: Path) -> None:
    """After the preemption save the trainer leaves with the requeue code even when a SIGTERM comes
    while it exits (it used to die of it: -15, which the launcher reported as a failed rank)."""
    out = tmp_path / "run"
    cfg = _write_config(tmp_path, out, steps=10**6)
    log = tmp_path / "trainer.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", SIGTERM_AFTER_MAIN, "--config", str(cfg)],
                                cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        _wait_for_steps(out, 3, lambda: proc.poll() is None, details=lambda: tail([log]))
        proc.send_signal(signal.SIGUSR1)
        assert wait_exit(proc, "the preempted trainer to exit", details=lambda: tail([log])) == 75, \
            tail([log])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _checkpoint_steps(out) == [len(_steps_logged(out))]


# ----------------------------------------------------------------------------------------------
# batch-script decisions that need no training: a test-only stand-in trainer (no torch import) in a
# scratch copy of the launch files, started through the real fake-srun -> torchrun -> worker.sh chain

STANDIN_TRAINER = """
import json, os, signal, sys, time
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(n))
mode = os.environ.get("STANDIN_MODE")
if mode == "fail":
    sys.exit(3)
if mode == "env":  # what the launch chain handed this rank
    keys = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")
    with open(os.path.join(os.environ["STANDIN_DIR"], "env." + os.environ["RANK"]), "w") as f:
        json.dump({k: os.environ.get(k) for k in keys}, f)
    sys.exit(0)
if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
    sys.exit(0)   # the requeued run: done at once
open(os.path.join(os.environ["STANDIN_DIR"], "ready." + os.environ["RANK"]), "w").close()
while not got:
    time.sleep(0.05)
sys.exit(75)   # as the trainer does after its collective save
"""


def _stop_fake_job(proc: subprocess.Popen, env: dict, job_id: str) -> None:
    """After a failed wait: kill the fake job's steps (their own process groups) and its sbatch."""
    if proc.poll() is None:
        subprocess.run(["scancel", "--full", "--signal=KILL", job_id], env=env)
        proc.kill()
        proc.wait()


def _standin_repo(tmp: Path) -> Path:
    repo = tmp / "repo"
    shutil.copytree(REPO / "slurm", repo / "slurm")
    (repo / "framer_dist").mkdir()
    (repo / "framer_dist" / "train.py").write_text(STANDIN_TRAINER)
    (repo / "run.toml").write_text("")
    return repo


def _standin_env(tmp: Path, repo: Path, mode: str) -> dict:
    return dict(os.environ, PATH=f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}",
                FAKE_SLURM_STATE=str(tmp / "state"), FAKE_SLURM_JOB_ID="77", CONFIG="run.toml",
                PYTHON=sys.executable, GPUS_PER_NODE="1", LOG_DIR=str(tmp / "logs"),
                RDZV_PORT=str(_free_port()), STANDIN_DIR=str(tmp), STANDIN_MODE=mode)


def _standin_job_stopped_by(tmp: Path, *operator_cmd: str) -> str:
    """A 1-node stand-in job, stopped once its trainer runs by ``operator_cmd`` (what a person
    types: scancel, scontrol requeue); the batch log."""
    repo = _standin_repo(tmp)
    env = _standin_env(tmp, repo, "wait")
    proc = subprocess.Popen(["sbatch", "--nodes=1", "--output=batch.out", "slurm/train_dit.sh"],
                            cwd=repo, env=env)

    def job_logs() -> str:
        return tail([repo / "batch.out", *sorted((tmp / "logs").rglob("*.log"))])

    try:
        wait_until((tmp / "ready.0").exists, "the stand-in trainer to start",
                   alive=lambda: proc.poll() is None, ended="the job ended first", details=job_logs)
        subprocess.run(list(operator_cmd), env=env, check=True)
        assert wait_exit(proc, "the stopped job to end", details=job_logs) == 0, job_logs()
    finally:
        _stop_fake_job(proc, env, "77")
    return (repo / "batch.out").read_text()


@pytest.mark.distributed
def test_batch_script_does_not_requeue_a_cancelled_job(tmp_path: Path) -> None:
    log = _standin_job_stopped_by(tmp_path, "scancel", "77")  # TERM to the batch shell and steps
    assert "job was cancelled, not requeueing" in log, log
    assert not (tmp_path / "state" / "requeued").exists()
    assert (tmp_path / "logs" / "framer-dit-77" / "restart0" / "exit" / "rank0.code").read_text().strip() == "75"


@pytest.mark.distributed
def test_batch_script_tells_a_slurm_requeue_from_a_cancel(tmp_path: Path) -> None:
    """`scontrol requeue` (or preemption with PreemptMode=REQUEUE) also sends SIGTERM to the batch
    shell and the steps; SLURM requeues the job itself, and the script must say so."""
    log = _standin_job_stopped_by(tmp_path, "scontrol", "requeue", "77")
    assert "checkpoint saved; SLURM requeued the job (scontrol requeue or preemption)" in log, log
    assert "cancelled" not in log and "after preemption signal" not in log, log
    assert (tmp_path / "state" / "requeued").read_text().split() == ["77"]  # only the operator's
    assert (tmp_path / "logs" / "framer-dit-77" / "restart1" / "exit" / "rank0.code").read_text().strip() == "0"


def _standin_header(tmp: Path, repo: Path, env: dict, *sbatch_args: str,
                    header_has: str = "") -> tuple[str, dict]:
    """Run the stand-in in "env" mode; the script's header line and what rank 0 was handed.
    ``header_has`` is checked as soon as the header is written (before a rendezvous that could
    hang)."""
    env = dict(env, STANDIN_MODE="env")
    env.pop("GPUS_PER_NODE")   # what SLURM allocated decides
    env.pop("OMP_NUM_THREADS", None)
    (repo / "batch.out").unlink(missing_ok=True)
    proc = subprocess.Popen(["sbatch", *sbatch_args, "--output=batch.out", "slurm/train_dit.sh"],
                            cwd=repo, env=env)

    def job_logs() -> str:
        return tail([repo / "batch.out", *sorted((tmp / "logs").rglob("*.log"))])

    try:
        wait_until(lambda: (repo / "batch.out").exists()
                   and "[train_dit] job" in (repo / "batch.out").read_text(),
                   "the script's header line", alive=lambda: proc.poll() is None,
                   ended="the job ended first", details=job_logs)
        header = next(ln for ln in (repo / "batch.out").read_text().splitlines()
                      if ln.startswith("[train_dit] job"))
        assert header_has in header, header
        assert wait_exit(proc, "the job to end", details=job_logs) == 0, job_logs()
    finally:
        _stop_fake_job(proc, env, "77")
    return header, json.loads((tmp / "env.0").read_text())


@pytest.mark.distributed
def test_batch_script_rendezvous_on_the_node_address_when_its_name_does_not_resolve(
        tmp_path: Path) -> None:
    repo = _standin_repo(tmp_path)
    env = dict(_standin_env(tmp_path, repo, "env"), FAKE_SLURM_HOST="fdn-does-not-resolve",
               FAKE_SLURM_NODE_ADDR="127.0.0.1")
    _standin_header(tmp_path, repo, env, "--nodes=2", "--gpus-per-node=0",
                    header_has="rendezvous 127.0.0.1:")  # then the 2 ranks meet there


@pytest.mark.distributed
def test_batch_script_on_cpu_nodes_runs_one_worker_per_node_with_all_its_cpus(tmp_path: Path) -> None:
    """`--gpus-per-node=0` (a CPU partition, no GPU gres): SLURM leaves SLURM_GPUS_ON_NODE unset;
    one worker per node, which gets every CPU allocated on its node."""
    repo = _standin_repo(tmp_path)
    env = dict(_standin_env(tmp_path, repo, "env"), FAKE_SLURM_CPUS="6")
    header, rank0 = _standin_header(tmp_path, repo, env, "--nodes=2", "--gpus-per-node=0")
    assert "2 node(s) x 1 worker(s) (no GPU(s) allocated per node, 6 CPU(s) per node" in header
    assert rank0 == {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "SLURM_CPUS_PER_TASK": "6",
                     "OMP_NUM_THREADS": "6"}
    header, rank0 = _standin_header(tmp_path, repo, env, "--nodes=1", "--gpus-per-node=3")
    assert rank0["LOCAL_WORLD_SIZE"] == "3" and rank0["OMP_NUM_THREADS"] == "2"  # 6 CPUs / 3
    text = (REPO / "slurm" / "train_dit.sh").read_text()
    assert "#SBATCH --cpus-per-task" not in text  # a fixed count pends forever on smaller nodes


@pytest.mark.distributed
def test_batch_script_reports_a_failed_trainer_without_requeue(tmp_path: Path) -> None:
    repo = _standin_repo(tmp_path)
    env = _standin_env(tmp_path, repo, "fail")
    r = subprocess.run(["sbatch", "--nodes=1", "--output=batch.out", "slurm/train_dit.sh"],
                       cwd=repo, env=env, timeout=HANG_S)
    assert r.returncode != 0
    log = (repo / "batch.out").read_text()
    assert "training failed" in log, log
    assert not (tmp_path / "state" / "requeued").exists()
    assert (tmp_path / "logs" / "framer-dit-77" / "restart0" / "exit" / "rank0.code").read_text().strip() == "3"
