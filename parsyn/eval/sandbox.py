"""Run untrusted Python (model-written solutions plus their tests) in a limited subprocess.

    result = run(solution + "\\n" + tests, limits=Limits(timeout_s=5))
    result.status  # "passed" | "failed" | "timeout" | "memory" | "error"

Each run gets a fresh temporary working directory (removed afterwards), an isolated interpreter
(`python -I`: no user site, no PYTHON* variables, script folder off `sys.path`), a minimal environment (no
tokens inherited from ours), resource limits (address space, CPU seconds, file size, open files), a wall-clock
deadline after which the whole process group is killed, and no network: a fresh network namespace through
`unshare` where this machine allows it, and in any case a Python-level guard on `socket`.

Not a security boundary against hostile code: the code runs as our user and sees the file system. It guards
against the accidents generated code makes (infinite loops, runaway memory, stray sockets, litter).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

STATUSES = ("passed", "failed", "timeout", "memory", "error")

# Exit codes of the runner below. Success is a code user code is unlikely to produce by itself, so a solution
# that calls `os._exit(0)` before its tests run does not pass.
_PASSED, _MEMORY, _COMPILE, _EARLY_EXIT = 86, 87, 88, 89

# The child sets its own limits before running the code (instead of `preexec_fn`, which the subprocess
# docs call unsafe when the parent has threads, and an evaluation harness may well score from a thread pool).
_RUNNER = r"""
import os, resource, socket, sys, traceback, _socket
path, memory, cpu, fsize, nofile = sys.argv[1], *map(int, sys.argv[2:6])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _no_network(*args, **kwargs):
    raise OSError("network disabled in sandbox")

socket.socket = socket.create_connection = socket.getaddrinfo = socket.fromfd = _no_network
_socket.socket = _no_network

def _finish(code, show=True):
    try:
        if show:
            kind, error, trace = sys.exc_info()
            traceback.print_exception(kind, error, trace.tb_next)  # from the solution's frame on
        sys.stdout.flush()
        sys.stderr.flush()
    except MemoryError:
        os.write(2, b"MemoryError\n")
    except OSError:
        pass  # output past the file-size limit; the status still tells
    os._exit(code)

try:
    with open(path, encoding="utf-8") as fh:
        program = compile(fh.read(), path, "exec")
except (SyntaxError, ValueError):
    _finish(%(compile)d)
scope = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(program, scope)
except MemoryError:
    scope.clear()  # free what the code held so the traceback can be printed
    _finish(%(memory)d)
except SystemExit as exc:
    print(f"exited with {exc.code!r} before the tests finished", file=sys.stderr)
    _finish(%(early)d, show=False)
except BaseException:
    _finish(1)
_finish(%(passed)d, show=False)
""" % {"compile": _COMPILE, "memory": _MEMORY, "early": _EARLY_EXIT, "passed": _PASSED}


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run. CPU seconds follow the deadline (`ceil(timeout_s) + 1`)."""

    timeout_s: float = 10.0            # wall clock, Python start-up included
    memory_bytes: int = 512 * 2**20    # address space
    file_bytes: int = 16 * 2**20       # largest file the code may write (its output too)
    open_files: int = 64
    output_chars: int = 4000           # tail of stdout+stderr kept in the result

    def __post_init__(self):
        for name in ("timeout_s", "memory_bytes", "file_bytes", "open_files", "output_chars"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"Limits.{name} must be positive, got {value!r}")


@dataclass(frozen=True)
class Result:
    """How a run ended: `passed` (ran to the end), `failed` (raised, e.g. an assert, or exited early),
    `timeout` (wall-clock deadline or CPU limit), `memory` (MemoryError under the address-space limit),
    `error` (did not compile, or the interpreter died from a signal)."""

    status: str
    seconds: float
    output: str

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown sandbox status {self.status!r} (one of {', '.join(STATUSES)})")

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=None)
def network_prefix() -> tuple[str, ...]:
    """The command prefix that puts a child in a fresh network namespace, or () where none works here.

    Checked once per process: root can `unshare --net`; other users need a user namespace as well."""
    if shutil.which("unshare") is None:
        return ()
    prefix = ("unshare", "--net") if os.geteuid() == 0 else ("unshare", "--user", "--map-root-user", "--net")
    try:
        probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return prefix if probe.returncode == 0 else ()


def run(code: str, *, limits: Limits = Limits()) -> Result:
    """Run `code` as a Python program in a fresh temporary folder under `limits`; never raises for what the
    code does, never leaves its processes or files behind."""
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    with tempfile.TemporaryDirectory(prefix="parsyn-sandbox-") as folder, tempfile.TemporaryFile() as output:
        with open(os.path.join(folder, "solution.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        start = time.monotonic()
        returncode, timed_out = _execute(_command(limits), folder, output, limits.timeout_s)
        seconds = time.monotonic() - start
        text = _tail(output, limits.output_chars)
    status, note = _status(returncode, timed_out)
    return Result(status, round(seconds, 3), text + note)


def _command(limits: Limits) -> list[str]:
    cpu_s = math.ceil(limits.timeout_s) + 1
    return [*network_prefix(), sys.executable, "-I", "-c", _RUNNER, "solution.py", str(limits.memory_bytes),
            str(cpu_s), str(limits.file_bytes), str(limits.open_files)]


def _execute(command: list[str], folder: str, output, timeout_s: float) -> tuple[int, bool]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
    # Output goes to an unnamed file, not a pipe: a pipe would keep us waiting on any grandchild that
    # inherited it, and could fill up and stall the child.
    proc = subprocess.Popen(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=output,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        returncode, timed_out = proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc.pid)  # also reaps whatever the code started in the background
    if timed_out:
        returncode = proc.wait()
    return returncode, timed_out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already empty


def _tail(output, chars: int) -> str:
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - 4 * chars))  # UTF-8 is at most 4 bytes a character
    return output.read().decode("utf-8", errors="replace")[-chars:]


def _status(returncode: int, timed_out: bool) -> tuple[str, str]:
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout", ""
    if returncode == _PASSED:
        return "passed", ""
    if returncode == _MEMORY:
        return "memory", ""
    if returncode == _COMPILE:
        return "error", ""
    if returncode < 0:
        return "error", f"\nkilled by {signal.Signals(-returncode).name}"
    if returncode in (1, _EARLY_EXIT):
        return "failed", ""
    return "failed", f"\nexited with code {returncode} before the tests finished"
