"""Fixtures shared by several test files, and settings made before any test module is imported."""
import contextlib
import os
import socket
import sys

import pytest
import torch

# Triton compiles its kernels for GPUs; without one, its interpreter runs them on CPU tensors (slowly): the tests of
# the Triton path (RepOpt*(triton=True)) need it set before triton is first imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the rest of the module. The models of the tests are tiny: a second thread gains nothing
    on an idle machine, and on a shared 2-core one two threads that wait for each other were measured 4x slower
    (training) to 20x slower (inference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def without_torchao(monkeypatch):
    """torchao cannot be imported (as without the `quant` extra), and repopt forgets the import it cached."""
    from repopt.quant import ptq

    ptq._torchao.cache_clear()
    # None in sys.modules makes an import raise ImportError; cover submodules an earlier test may have imported
    for name in ["torchao"] + [n for n in sys.modules if n.startswith("torchao.")]:
        monkeypatch.setitem(sys.modules, name, None)
    yield
    ptq._torchao.cache_clear()


@pytest.fixture
def busy_ports():
    """torch's default rendezvous port 29500 and the ports the DDP tests once fixed, held busy (as other jobs on the
    machine would hold them) while the test runs: a torchrun there must pick a free port (--standalone)."""
    with contextlib.ExitStack() as stack:
        for port in (29500, 29533, 29547):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            with contextlib.suppress(OSError):  # held by another program already: busy all the same
                sock.bind(("127.0.0.1", port))
                sock.listen()
        yield
