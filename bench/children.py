"""Child processes of the harness: spawn (pinned to CPUs), observe through ``/proc``, and kill.

Every child is started in its own session (so a Ctrl-C in the terminal reaches only the harness,
which then decides the order of shutdown) and remembered in a module registry; :func:`kill_all`
ends whatever is still running and is registered with ``atexit``. Children also get
``PR_SET_PDEATHSIG`` so that even a SIGKILLed harness does not leave a proxy pinned to a core.
Output goes to files in the run's work directory, never to pipes that could fill and stall a
child mid-benchmark.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1

_live: list[Child] = []

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec (so it only calls one C function): ask the
    kernel for SIGKILL when the harness goes away."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path | None
    stderr_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, limit: int = 1500) -> str:
        if self.stderr_path is None:
            return ""
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:].strip()
        except FileNotFoundError:
            return ""

    def stdout_text(self) -> str:
        if self.stdout_path is None:
            return ""
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pids(self) -> list[int]:
        """This process and all its descendants (nginx/HAProxy workers) that exist now."""
        return tree_pids(self.pid)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        """``sig`` to the main process, up to ``timeout`` to exit, then SIGKILL to its whole
        process group (the child's own session, so workers die too)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        with contextlib.suppress(ValueError):
            _live.remove(self)


def spawn(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    *,
    cpus: Iterable[int] | None = None,
    env: dict[str, str] | None = None,
    pipes: bool = False,
) -> Child:
    """Start ``argv`` in its own session, pinned to ``cpus`` (via ``taskset`` at exec, so every
    thread and forked worker inherits the mask). ``pipes``: stdin and stdout are pipes (for the
    idle-connection client's one-line handshake); otherwise output goes to files in ``workdir``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    full = list(argv)
    cpu_list = sorted(cpus) if cpus is not None else None
    taskset = shutil.which("taskset")
    if cpu_list and taskset:
        full = [taskset, "-c", ",".join(str(c) for c in cpu_list), *full]
    full_env = dict(os.environ)
    full_env.update(env or {})
    seq = len(list(workdir.glob(f"{name}-*.stderr"))) + 1
    err_path = workdir / f"{name}-{seq}.stderr"
    out_path: Path | None = None if pipes else workdir / f"{name}-{seq}.stdout"
    with open(err_path, "wb") as fe:
        if pipes:
            popen = subprocess.Popen(
                full,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=fe,
                cwd=str(workdir),
                env=full_env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        else:
            assert out_path is not None
            with open(out_path, "wb") as fo:
                popen = subprocess.Popen(
                    full,
                    stdin=subprocess.DEVNULL,
                    stdout=fo,
                    stderr=fe,
                    cwd=str(workdir),
                    env=full_env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
    child = Child(name, popen, out_path, err_path)
    _live.append(child)
    if cpu_list and not taskset:
        pin_tree(child.pid, cpu_list)
    return child


def run_to_end(
    name: str, argv: Sequence[str], workdir: Path, timeout: float, cpus: Iterable[int] | None = None
) -> tuple[int | None, str, str]:
    """Run a short-lived tool (wrk, iperf3) as a registered child; (exit code or None on
    timeout, stdout, stderr). Registered, so a Ctrl-C during a load run kills the tool too."""
    child = spawn(name, argv, workdir, cpus=cpus)
    try:
        code: int | None = child.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        child.stop(signal.SIGKILL, 1)
    return code, child.stdout_text(), child.stderr_tail(4000)


def read_line(child: Child, timeout: float) -> str | None:
    """One line from a ``pipes=True`` child's stdout, or None on timeout / EOF."""
    assert child.popen.stdout is not None
    fd = child.popen.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def kill_all() -> None:
    """End every child still registered (SIGTERM, then SIGKILL of its group after 3 s)."""
    for c in list(_live):
        c.stop(signal.SIGTERM, 3)


atexit.register(kill_all)


# ---------------------------------------------------------------------------------------------
# /proc readers
# ---------------------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    todo.extend(int(k) for k in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def pin_tree(pid: int, cpus: Iterable[int]) -> None:
    """Set the CPU mask of every thread of ``pid`` and of its descendants (threads need their
    own call: ``sched_setaffinity`` acts on one task)."""
    mask = set(cpus)
    for p in tree_pids(pid):
        try:
            tids = [int(t.name) for t in Path(f"/proc/{p}/task").iterdir()]
        except FileNotFoundError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, mask)


def affinity_of(pid: int) -> list[int]:
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return []


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime (``/proc/<pid>/stat`` fields 14 and 15, all threads) of ``pids``, seconds.

    Resolution is one clock tick (10 ms at USER_HZ 100): fine for loads of seconds.
    """
    ticks = 0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # fields 14, 15 counted from 1 with pid, comm
    return ticks / CLK_TCK


def _status_kib(pids: Iterable[int], key: str) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key):
                    total += int(line.split()[1])
                    break
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmRSS (KiB)."""
    return _status_kib(pids, "VmRSS:")


def hwm_kib(pids: Iterable[int]) -> int:
    """Sum of VmHWM, each process's peak resident set (KiB): the peak of the proxy as a whole
    is at most this, and equals it for single-process proxies."""
    return _status_kib(pids, "VmHWM:")


def core_ticks(cpus: Iterable[int]) -> tuple[int, int, int]:
    """(task, irq, steal) clock ticks of ``cpus`` since boot, from ``/proc/stat``. Task time is
    user + nice + system of every process that ran there; irq is irq + softirq (loopback
    packet processing lands here, mostly on behalf of the process that sent the packets);
    steal is the hypervisor's."""
    want = {f"cpu{c}" for c in cpus}
    task = irq = steal = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return 0, 0, 0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in want:
            vals = [int(v) for v in parts[1:]]
            task += vals[0] + vals[1] + vals[2]
            irq += vals[5] + vals[6]
            steal += vals[7] if len(vals) > 7 else 0
    return task, irq, steal


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Could a server bind ``host:port`` now? (SO_REUSEADDR as servers set it, so a leftover
    TIME_WAIT connection does not count as taken; a listener does.)"""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
