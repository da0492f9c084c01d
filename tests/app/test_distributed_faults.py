"""A frozen rank and a dead launcher, with real two-process gloo groups on CPU.

- A rank stopped with SIGSTOP must not hang the other for gloo's 30-minute default: with the
  process group's timeout (``--dist-timeout``) the waiting rank gives up and says why.
- ``kill -9`` of ``torchrun`` must not leave its workers running: each asks the kernel to kill it
  when its launcher dies (``prctl(PR_SET_PDEATHSIG)``, Linux only).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher guard is Linux-only")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie left unreaped by a container's init counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


FROZEN_RANK = textwrap.dedent("""
    import os, signal, sys, time
    from fastvq.train.distributed import collective_timeout, setup_distributed
    ctx = setup_distributed("cpu", timeout=float(sys.argv[1]))
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    started = time.monotonic()
    try:
        ctx.barrier()
    except RuntimeError as error:
        elapsed = time.monotonic() - started
        print(f"after {elapsed:.1f} s: {collective_timeout(error, ctx, float(sys.argv[1]))}", flush=True)
        os._exit(7)
    os._exit(0)
""")


def test_a_stopped_rank_makes_the_other_give_up_after_the_timeout(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    ranks = [
        subprocess.Popen([sys.executable, "-c", FROZEN_RANK, "2"], env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    try:
        out, _ = ranks[0].communicate(timeout=120)
        assert ranks[0].returncode == 7, out
        assert "rank 0 waited 2 s for the other ranks" in out and "--dist-timeout" in out, out
        waited = float(out.split("after ")[1].split(" s")[0])
        assert waited < 30, f"gave up only after {waited} s with a 2 s timeout"
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()


SLEEPING_WORKER = textwrap.dedent("""
    import os, sys, time
    from fastvq.train.distributed import setup_distributed
    ctx = setup_distributed("cpu", timeout=120)
    with open(os.path.join(sys.argv[1], f"rank{ctx.rank}.pid"), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(300)
""")


def test_workers_exit_when_torchrun_is_killed(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SLEEPING_WORKER)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         str(script), str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    pid_files = [tmp_path / f"rank{rank}.pid" for rank in range(2)]
    workers = []
    try:
        assert wait_until(lambda: all(path.exists() and path.read_text() for path in pid_files), 120), \
            "the workers never joined their group"
        workers = [int(path.read_text()) for path in pid_files]
        assert all(alive(pid) for pid in workers)
        launcher.kill()  # kill -9 of torchrun: no chance to stop its workers itself
        launcher.wait()
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 10), \
            f"workers {[pid for pid in workers if alive(pid)]} outlived their launcher"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
