"""The waiting helpers of the tests (tests/_waiting.py): they return when the state is reached,
fail at once when what they wait for has ended, and only a hang reaches their bound."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _parallel_launch import free_port
from _waiting import Hang, run_exits_before_listening, tail, wait_exit, wait_until


def test_wait_until_returns_at_the_first_look_that_sees_the_state() -> None:
    looks = []
    wait_until(lambda: looks.append(1) or len(looks) == 5, "five looks", poll=0)
    assert len(looks) == 5


def test_wait_until_fails_at_once_when_what_it_waits_for_has_ended() -> None:
    with pytest.raises(AssertionError, match=r"the run ended \(waiting for a step\)\nLOG") as e:
        wait_until(lambda: False, "a step", alive=lambda: False, ended="the run ended",
                   details=lambda: "LOG")
    assert not isinstance(e.value, Hang)  # at once, not at the bound


def test_wait_until_takes_a_state_reached_as_the_thing_ended() -> None:
    seen = iter([False, True])  # not ready at the first look, ready at the second
    wait_until(lambda: next(seen), "it", alive=lambda: False)


def test_wait_until_at_its_bound_stops_the_hang_and_shows_the_details() -> None:
    stopped = []
    with pytest.raises(Hang, match=r"^the job: not after 0 s \(only a hang takes that long\)\nLOGS$"):
        wait_until(lambda: False, "the job", bound=0.05, poll=0.01, details=lambda: "LOGS",
                   on_hang=lambda: stopped.append(1))
    assert stopped == [1]


def test_wait_exit_returns_the_exit_code_and_kills_a_hang() -> None:
    assert wait_exit(subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]), "exit") == 3
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with pytest.raises(Hang, match="the sleeper: not after"):
        wait_exit(p, "the sleeper", bound=0.2)
    assert p.wait() == -9  # killed by the helper


def test_run_exits_before_listening(tmp_path: Path) -> None:
    port = free_port()
    r = run_exits_before_listening([sys.executable, "-c", "print('out'); raise SystemExit(2)"], port)
    assert (r.returncode, r.stdout) == (2, "out\n")
    # one that reaches the rendezvous (rank 0 hosts the store on MASTER_PORT) and would block
    listener = ("import socket, time; s = socket.socket(); s.bind(('127.0.0.1', %d)); s.listen();"
                "print('listening', flush=True); time.sleep(600)" % port)
    with pytest.raises(AssertionError, match=f"listens on port {port}: it reached the process group"
                                             r"[^\n]*\nlistening") as e:
        run_exits_before_listening([sys.executable, "-c", listener], port)
    assert not isinstance(e.value, Hang)  # at once, not at the bound


def test_tail_names_each_log(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text("x" * 10 + "END")
    assert tail([tmp_path / "a.log", tmp_path / "missing.log"], n=3) == f"--- {tmp_path / 'a.log'}\nEND\n"
    assert tail([tmp_path / "missing.log"]) == "(no logs)"
