"""Suite-wide settings."""

import signal

import pytest
import torch

# A suite started in the background of a non-interactive shell (`cmd &`, nohup, some CI runners)
# inherits SIGINT ignored, and every process it starts inherits that too: submitit's local
# cancel (SIGINT to the tasks) then does nothing and test_launch's cancelled job runs on. The
# suite behaves as if started from a terminal: children get SIGINT's default action back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors: one thread is much faster than two contended ones on the 2-core CI box (and the
    distributed tests run several ranks there at once). `make test` also sets OMP_NUM_THREADS=1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
