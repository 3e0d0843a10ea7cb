"""Submit FRAMER training through submitit: a SLURM job (AutoExecutor) or this machine (--local).

    python tools/submit.py --config configs/sd35m_framer.toml --nodes 4 --gpus-per-node 8 \
        --partition gpu --constraint h200 --time 24:00:00 [section.key=value ...]
    python tools/submit.py --local --tasks 2 --config configs/tiny_cpu_demo.toml train.device=cpu

Each submitit task (one per GPU) runs the trainer (framer_dist/train.py) as a child process with
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from submitit's TorchDistributedEnvironment and
`--resume auto`. Preemption, the order that matters:

1. SLURM sends the preemption signal (USR2, `signal_delay_s` before the time limit) to every
   process of the job; the local executor sends it to every task. While the trainer runs, each
   task forwards it to its trainer instead of letting submitit's handler requeue at once (that
   handler runs on global rank 0 only and would requeue before anything is saved).
2. The trainer's own handler sets a flag; the ranks agree on it at the next step, save one
   collective checkpoint, pass a barrier, and every rank exits with checkpoint.requeue_exit_code.
3. Only then does the rank-0 task hand over to submitit's handler, which calls
   :meth:`TrainJob.checkpoint` (the same job again: it always resumes with `--resume auto`) and
   requeues (`scontrol requeue`, or the local controller's restart). The other tasks just exit.

A SIGTERM also makes the trainer save. After `scontrol requeue` or a preemption with
PreemptMode=REQUEUE, SLURM requeues the job itself (the tasks say so and exit); after a scancel the
job ends there (resubmit to resume). Resubmitting with another node or task count resumes from the
newest checkpoint (the trainer reshards).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from framer_dist.config import ConfigError, load_config

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


@dataclass
class TrainSpec:
    """Everything a task needs to start the trainer; pickled into the job."""

    config: str                      # absolute path of the run config
    backend_args: list[str]          # ["--backend", "fsdp2"] or ["--ds", "<abs json>"]
    overrides: list[str]             # dotted config overrides
    workdir: str                     # cwd of the submission: relative paths resolve as there
    python: str = sys.executable
    requeue_exit_code: int = 75      # checkpoint.requeue_exit_code of the validated config
    local: bool = False              # local executor: rendezvous on 127.0.0.1
    env: dict[str, str] = field(default_factory=dict)   # extra environment for the trainer


def trainer_command(spec: TrainSpec, preempt_signal: str) -> list[str]:
    """The trainer's command line for one task (always `--resume auto`)."""
    return [spec.python, str(TRAIN_SCRIPT), "--config", spec.config, *spec.backend_args,
            "--resume", "auto", f"checkpoint.preempt_signal={preempt_signal}",
            f"checkpoint.requeue_exit_code={spec.requeue_exit_code}", *spec.overrides]


def _usr_signal() -> signal.Signals:
    """The signal submitit treats as preemption (USR2 unless SUBMITIT_PREEMPT_SIGNAL says else)."""
    name = "SIG" + submitit.JobEnvironment.USR_SIG
    if name not in ("SIGUSR1", "SIGUSR2"):
        raise RuntimeError(f"SUBMITIT_PREEMPT_SIGNAL={submitit.JobEnvironment.USR_SIG!r}: the "
                           "trainer handles only USR1 or USR2")
    return signal.Signals[name]


def _scontrol(*args: str) -> str:
    """scontrol's output ('' when SLURM cannot be asked: then the callers assume nothing)."""
    try:
        r = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout if r.returncode == 0 else ""


def slurm_requeued() -> bool:
    """Whether SLURM has requeued this job since this run started (scontrol requeue, preemption
    with PreemptMode=REQUEUE): SLURM counts a requeue at once, so the job's Restarts is then above
    this run's SLURM_RESTART_COUNT; a cancelled job keeps its count."""
    job_id = os.environ.get("SLURM_JOB_ID")
    m = re.search(r"\bRestarts=(\d+)", _scontrol("show", "job", "-o", job_id)) if job_id else None
    return bool(m) and int(m.group(1)) > int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def rendezvous_host(name: str) -> str:
    """``name`` when it resolves here, else the node's NodeAddr: a cluster may address its nodes
    by address only, and c10d would hang on a name that does not resolve."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except socket.gaierror:
        pass
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", name))
    if not m:
        raise RuntimeError(f"the first node's name {name!r} does not resolve and scontrol shows "
                           "no NodeAddr for it")
    return m.group(1)


class TrainJob(Checkpointable):
    """The submitit callable: one call per task runs that task's trainer process."""

    def __init__(self, spec: TrainSpec, attempt: int = 0) -> None:
        self.spec = spec
        self.attempt = attempt

    def _child_env(self) -> dict[str, str]:
        dist = TorchDistributedEnvironment()
        env = dict(os.environ)
        env.update(self.spec.env)
        env.update(RANK=str(dist.rank), WORLD_SIZE=str(dist.world_size),
                   LOCAL_RANK=str(dist.local_rank), LOCAL_WORLD_SIZE=str(dist.local_world_size),
                   MASTER_ADDR="127.0.0.1" if self.spec.local else rendezvous_host(dist.master_addr),
                   MASTER_PORT=str(dist.master_port))
        # Both executors hand every task all of the node's GPUs; the trainer picks cuda:LOCAL_RANK.
        cores = len(os.sched_getaffinity(0))
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, dist.local_world_size))))
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        return env

    def __call__(self) -> dict[str, Any]:
        job_env = submitit.JobEnvironment()
        rank = job_env.global_rank
        usr = _usr_signal()
        cmd = trainer_command(self.spec, usr.name)
        restart = os.environ.get("SLURM_RESTART_COUNT")  # SLURM's own requeues keep the attempt
        print(f"[framer_dist.launch] task {rank}/{job_env.num_tasks} attempt {self.attempt}"
              + (f" (SLURM restart {restart})" if restart else "") + ": " + " ".join(cmd), flush=True)
        seen: set[int] = set()
        child: subprocess.Popen | None = None

        def forward(signum: int, frame: Any) -> None:
            # SLURM signals the trainer directly too; a second copy only sets the same flag.
            seen.add(signum)
            try:
                if child is not None:
                    child.send_signal(signum)
            except ProcessLookupError:
                pass

        # installed before the trainer starts: a signal in between must not reach submitit's
        # handler (on rank 0 it would requeue before anything is saved)
        submitit_handler = signal.getsignal(usr)
        previous = {s: signal.signal(s, forward) for s in (usr, signal.SIGTERM)}
        try:
            child = subprocess.Popen(cmd, cwd=self.spec.workdir, env=self._child_env())
            for s in sorted(seen):  # came while it was starting
                child.send_signal(s)
            rc = child.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

        if rc == 0:
            return {"rank": rank, "exit_code": 0, "attempt": self.attempt}
        # The requeue code, or killed by a signal that came to this task too (before the trainer
        # had installed its handler: nothing new to save then, the newest checkpoint stands).
        stopped = rc == self.spec.requeue_exit_code or (rc < 0 and -rc in seen)
        if not stopped:
            raise RuntimeError(f"trainer on rank {rank} failed with exit code {rc} "
                               f"(attempt {self.attempt}); its output is in this task's log")
        if usr not in seen:  # SIGTERM only: SLURM's own requeue, or a cancel
            if slurm_requeued():
                print(f"[framer_dist.launch] task {rank}: trainer stopped (exit code {rc}); SLURM "
                      "requeued the job (scontrol requeue or preemption): its next run resumes from "
                      "the newest checkpoint", flush=True)
                sys.exit(0)
            raise UncompletedJobError(
                f"rank {rank}: stopped by SIGTERM (scancel); the checkpoint is saved and the job is "
                "not requeued: resubmit to resume")
        how = ("saved and exited for requeue" if rc == self.spec.requeue_exit_code
               else f"stopped by signal {-rc} after the preemption signal")
        print(f"[framer_dist.launch] task {rank}: trainer {how}", flush=True)
        if rank == 0:
            if not callable(submitit_handler):
                raise RuntimeError("not running under a submitit executor: cannot requeue")
            # submitit's own handler: checkpoint() -> requeue -> exit. On SLURM that exit is -1
            # after `scontrol requeue`, and SLURM then SIGTERMs every task still running (the
            # others may still be exiting: they have saved, and a SIGTERM no longer kills their
            # trainers): exit 0 instead, nothing failed. The local executor's requeue is its
            # exit code: keep that.
            try:
                submitit_handler(usr, None)
            except SystemExit:
                if job_env.name() != "slurm":
                    raise
            print(f"[framer_dist.launch] task 0: requeue requested (attempt {self.attempt + 1} "
                  "resumes from the checkpoint)", flush=True)
        sys.exit(0)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Resubmit the same training; the trainer finds its checkpoint with --resume auto."""
        return DelayedSubmission(TrainJob(replace(self.spec), self.attempt + 1))


# ----------------------------------------------------------------------------------------------
# command line


def parse_time_minutes(text: str) -> int:
    """'90' (minutes), 'HH:MM:SS', 'MM:SS' or 'D-HH:MM:SS' -> minutes (rounded up)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"--time {text!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if b is None and c is None:  # 'M', or 'D-H' (SLURM reads the number after a day as hours)
        seconds = a * 3600 + days * 86400 if days is not None else a * 60
    elif c is None:
        seconds = (days or 0) * 86400 + (a * 3600 + b * 60 if days is not None else a * 60 + b)
    else:
        seconds = (days or 0) * 86400 + a * 3600 + b * 60 + c
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"--time {text!r} must be positive")
    return -(-seconds // 60)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="submit.py", description="Submit FRAMER training with submitit (SLURM or --local).",
        epilog="Trailing section.key=value arguments are passed to the trainer as config overrides.")
    p.add_argument("--config", required=True, help="run config (TOML, see configs/)")
    p.add_argument("--backend", choices=["fsdp2", "deepspeed", "none"], default=None,
                   help="data-parallel backend (default fsdp2; --ds implies deepspeed)")
    p.add_argument("--ds", metavar="JSON", help="DeepSpeed config, e.g. ds_configs/zero3.json")
    g = p.add_argument_group("SLURM")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8,
                   help="one task per GPU; 0: a CPU partition, --tasks per node")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint", help="node feature, e.g. h200")
    g.add_argument("--mem", help="memory per node as SLURM spells it, e.g. 0 (all) or 900G")
    g.add_argument("--time", type=parse_time_minutes, default=24 * 60,
                   help="time limit: minutes, HH:MM:SS or D-HH:MM:SS (default 24:00:00)")
    g.add_argument("--signal-delay", type=int, default=300, metavar="S",
                   help="send USR2 this many seconds before the time limit; must cover a step "
                        "plus the collective save (SLURM may send it up to 60 s earlier)")
    g.add_argument("--max-requeues", type=int, default=100,
                   help="time-limit requeues submitit allows before it gives up")
    g.add_argument("--job-name", default="framer")
    g.add_argument("--exclusive", action="store_true", help="whole nodes")
    here = p.add_argument_group("this machine")
    here.add_argument("--local", action="store_true", help="run here with submitit's local executor")
    here.add_argument("--tasks", type=int, default=None,
                   help="ranks per node without GPUs (--cpu, or --gpus-per-node 0 on SLURM); with "
                        "--local also with GPUs (default: one per GPU, else 1)")
    here.add_argument("--cpu", action="store_true", help="--local: no GPUs (tests, CPU demo)")
    p.add_argument("--folder", help="submitit logs and pickles (default <train.out_dir>/submitit)")
    p.add_argument("--python", default=sys.executable, help="python on the compute nodes")
    p.add_argument("--wait", action="store_true", help="block until the job ends (default with --local)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the sbatch script the SLURM executor would submit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


@dataclass
class Plan:
    """A validated submission: what to run and how to queue it."""

    spec: TrainSpec
    folder: Path
    cluster: str
    parameters: dict[str, Any]
    max_requeues: int


def plan_submission(args: argparse.Namespace) -> Plan:
    """Validate everything (config, paths, sizes) before anything is queued; ConfigError if bad."""
    cwd = Path.cwd()
    cfg_path = Path(args.config)
    if not cfg_path.is_file():
        raise ConfigError(f"config file not found: {cfg_path}")
    backend = args.backend or ("deepspeed" if args.ds else "fsdp2")
    if backend == "deepspeed":
        if not args.ds:
            raise ConfigError("--backend deepspeed needs --ds <DeepSpeed JSON> (e.g. ds_configs/zero3.json)")
        if not Path(args.ds).is_file():
            raise ConfigError(f"DeepSpeed config not found: {args.ds}")
        backend_args = ["--ds", str(Path(args.ds).resolve())]
        extra = ['parallel.backend="deepspeed"', f'parallel.ds_config="{Path(args.ds).resolve()}"']
    else:
        if args.ds:
            raise ConfigError(f"--ds given with --backend {backend}: drop one of them")
        backend_args = ["--backend", backend]
        extra = [f'parallel.backend="{backend}"']
    # as the trainer will see it (trainer_command adds --resume auto)
    cfg = load_config(cfg_path, [*args.overrides, *extra, 'checkpoint.resume="auto"'])  # names the bad key
    if any(o.split("=", 1)[0].strip() == "checkpoint.preempt_signal" for o in args.overrides):
        raise ConfigError("config key 'checkpoint.preempt_signal' is set by the launcher to the "
                          "signal submitit sends (SUBMITIT_PREEMPT_SIGNAL, default USR2); drop "
                          "the override")

    for name in ("nodes", "gpus_per_node", "cpus_per_task", "tasks", "signal_delay", "max_requeues"):
        v = getattr(args, name)
        if v is not None and v < (0 if name in ("gpus_per_node", "max_requeues") else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.local and args.nodes != 1:
        raise ConfigError("--local runs on one machine: --nodes must be 1")
    if not args.local and args.gpus_per_node > 0 and args.tasks not in (None, args.gpus_per_node):
        raise ConfigError(f"--tasks {args.tasks} with --gpus-per-node {args.gpus_per_node}: on "
                          "SLURM there is one task per GPU (--tasks is for --gpus-per-node 0)")
    if not args.local and args.time * 60 <= args.signal_delay:
        raise ConfigError(f"--signal-delay {args.signal_delay}s is not shorter than --time "
                          f"({args.time} min)")

    out_dir = Path(cfg.train.out_dir)
    folder = Path(args.folder) if args.folder else out_dir / "submitit"
    spec = TrainSpec(config=str(cfg_path.resolve()), backend_args=backend_args,
                     overrides=list(args.overrides), workdir=str(cwd), python=args.python,
                     requeue_exit_code=cfg.checkpoint.requeue_exit_code, local=args.local)
    params: dict[str, Any] = {"name": args.job_name, "timeout_min": args.time, "nodes": args.nodes}
    if args.local:
        gpus = 0 if args.cpu else args.gpus_per_node
        params.update(tasks_per_node=args.tasks or max(gpus, 1), gpus_per_node=gpus)
        if args.cpus_per_task:
            params["cpus_per_task"] = args.cpus_per_task
        cluster = "local"
    else:
        if args.gpus_per_node:
            params.update(tasks_per_node=args.gpus_per_node, gpus_per_node=args.gpus_per_node)
        else:  # no GPU request at all: a cluster without GPU gres refuses even --gpus-per-node=0
            params.update(tasks_per_node=args.tasks or 1)
        params.update(slurm_signal_delay_s=args.signal_delay,
                      slurm_additional_parameters={"requeue": True},
                      # a crashed rank ends the job instead of leaving the others in a collective
                      slurm_srun_args=["--kill-on-bad-exit=1"])
        for key in ("cpus_per_task",):
            if getattr(args, key):
                params[key] = getattr(args, key)
        for key in ("partition", "account", "qos", "constraint", "mem"):
            if getattr(args, key):
                params[f"slurm_{key}"] = getattr(args, key)
        if args.exclusive:
            params["slurm_exclusive"] = True
        cluster = "slurm"
    # the trainer's own up-front checks (paths, crop size, DeepSpeed JSON, global batch) for the
    # world size this job will have, so that a bad run never waits in the queue
    from framer_dist.preflight import check_paths
    check_paths(cfg, world_size=params["nodes"] * params["tasks_per_node"], on_this_machine=False)
    return Plan(spec=spec, folder=folder, cluster=cluster, parameters=params,
                max_requeues=args.max_requeues)


class _Watcher(SlurmInfoWatcher):
    """submitit reads job states from sacct; without accounting (no sacct, or its storage
    disabled) every state reads UNKNOWN. Then ask squeue, which knows a job until MinJobAge after
    it ends, in the same `JobID|State|NodeList` form."""

    _sacct: bool | None = None   # does sacct answer here? (asked once)

    def _make_command(self) -> list[str] | None:
        command = super()._make_command()
        if command is None:
            return None
        if self._sacct is None:
            self._sacct = shutil.which("sacct") is not None and subprocess.run(
                [*command, "--noheader"], capture_output=True).returncode == 0
        if self._sacct:
            return command
        ids = ",".join(sorted({x.split("_")[0] for x in self._registered - self._finished}))
        return ["squeue", "--states=all", f"--jobs={ids}", "--format=%i|%T|%N"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        if isinstance(string, bytes):
            string = string.decode()
        if string.startswith("JOBID|STATE|NODELIST"):  # squeue's header, as sacct names them
            string = "JobID|State|NodeList" + string[len("JOBID|STATE|NODELIST"):]
        return super().read_info(string)


class _SlurmJob(SlurmJob):
    watcher = _Watcher(delay_s=600)


def make_executor(plan: Plan) -> submitit.AutoExecutor:
    kw = {f"{plan.cluster}_max_num_timeout": plan.max_requeues}
    if plan.cluster == "slurm" and not shutil.which("srun"):
        raise ConfigError("SLURM not found (no srun on PATH): submit from a login node, or use "
                          "--local to run on this machine")
    ex = submitit.AutoExecutor(folder=plan.folder, cluster=plan.cluster, **kw)
    ex.update_parameters(**plan.parameters)
    if plan.cluster == "slurm":
        ex._executor.job_class = _SlurmJob  # job states also without accounting
    return ex


def submit(plan: Plan) -> submitit.Job:
    """Queue the job (nothing is queued before the plan validated)."""
    return make_executor(plan).submit(TrainJob(plan.spec))


def sbatch_preview(plan: Plan) -> str:
    """The sbatch script submitit would write for this plan (nothing is submitted)."""
    ex = make_executor(plan)
    return ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "preview")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a missing --config stops here (exit 2), nothing queued
    try:
        plan = plan_submission(args)
        if args.dry_run:
            if plan.cluster == "slurm":
                print(sbatch_preview(plan))
            print("trainer command per task:",
                  " ".join(trainer_command(plan.spec, "SIG" + submitit.JobEnvironment.USR_SIG)))
            return 0
        job = submit(plan)
    except ConfigError as e:
        parser.error(str(e))
    print(f"submitted job {job.job_id} ({plan.cluster}); logs: {plan.folder}")
    if not (args.wait or args.local):
        return 0
    try:
        while not job.done():
            time.sleep(2)
        job.results()
    except KeyboardInterrupt:
        job.cancel()
        return 130
    except Exception as e:  # a failed job: say where its logs are
        print(f"job {job.job_id} failed: {e}\nlogs: {plan.folder}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
