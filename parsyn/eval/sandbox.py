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
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

STATUSES = ("passed", "failed", "timeout", "memory", "error")

# Exit codes of the runner below for the outcomes other than a pass. A pass is never read from an exit code
# (the code controls those): the runner proves it by writing a per-run secret to a pipe only after the program
# returned, and the parent declares "passed" only when that pipe holds exactly the secret.
_MEMORY, _COMPILE, _EARLY_EXIT = 87, 88, 89
_STARTED = b"+"  # written to the proof pipe before the code runs: the sandbox itself worked

# The child sets its own limits before running the code (instead of `preexec_fn`, which the subprocess
# docs call unsafe when the parent has threads, and an evaluation harness may well score from a thread pool).
# It keeps its own references to what it calls after the code ran, so patching `os._exit`, `traceback` or
# `sys.stderr` changes nothing; the secret is read from an inherited pipe and that pipe closed before the code
# runs, and it stays only in `_main`'s frame (not in argv, the environment, a file or a module global).
_RUNNER = r"""
import os, sys

def _main():
    import builtins, resource, socket, traceback, types, _socket
    key_fd, proof_fd, memory, cpu, fsize, nofile, nproc = map(int, sys.argv[1:8])
    sys.argv[:] = ["solution.py"]
    key = b""
    while chunk := os.read(key_fd, 256):
        key += chunk
    os.close(key_fd)
    os.set_inheritable(proof_fd, False)
    write, exit_, show_error, out, err = os.write, os._exit, traceback.print_exception, sys.stdout, sys.stderr
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))

    def no_network(*args, **kwargs):
        raise OSError("network disabled in sandbox")

    socket.socket = socket.create_connection = socket.getaddrinfo = socket.fromfd = _socket.socket = no_network

    def finish(code, show=True):
        try:
            if show:
                kind, error, trace = sys.exc_info()
                show_error(kind, error, trace.tb_next, file=err)  # from the solution's frame on
            for stream in (sys.stdout, sys.stderr, out, err):
                stream.flush()
        except MemoryError:
            write(2, b"MemoryError\n")
        except BaseException:
            pass  # output past the file-size limit, or streams the code replaced; the status still tells
        if code is None:
            try:
                write(proof_fd, key)
            except BaseException:
                code = 1
        exit_(code or 0)

    write(proof_fd, %(started)r)
    try:
        with open("solution.py", encoding="utf-8") as fh:
            program = compile(fh.read(), "solution.py", "exec")
    except (SyntaxError, ValueError):
        finish(%(compile)d)
    module = types.ModuleType("__main__")
    module.__file__, module.__builtins__ = "solution.py", builtins
    sys.modules["__main__"] = module
    try:
        exec(program, module.__dict__)
    except MemoryError:
        module.__dict__.clear()  # free what the code held so the traceback can be printed
        finish(%(memory)d)
    except SystemExit as exc:
        print(f"exited with {exc.code!r} before the tests finished", file=err)
        finish(%(early)d, show=False)
    except BaseException:
        finish(1)
    finish(None, show=False)

_main()
""" % {"started": _STARTED, "compile": _COMPILE, "memory": _MEMORY, "early": _EARLY_EXIT}


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run. CPU seconds follow the deadline (`ceil(timeout_s) + 1`)."""

    timeout_s: float = 10.0            # wall clock, Python start-up included
    memory_bytes: int = 512 * 2**20    # address space
    file_bytes: int = 16 * 2**20       # largest file the code may write (its output too)
    open_files: int = 64
    processes: int = 64                # processes and threads the sandbox may hold at once (RLIMIT_NPROC)
    output_chars: int = 4000           # tail of stdout+stderr kept in the result

    def __post_init__(self):
        for name in ("timeout_s", "memory_bytes", "file_bytes", "open_files", "processes", "output_chars"):
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
    secret = secrets.token_hex(32).encode()
    with tempfile.TemporaryDirectory(prefix="parsyn-sandbox-", ignore_cleanup_errors=True) as folder, \
            tempfile.TemporaryFile() as output:
        with open(os.path.join(folder, "solution.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        start = time.monotonic()
        returncode, timed_out, proof = _execute(folder, output, limits, secret)
        seconds = time.monotonic() - start
        text = _tail(output, limits.output_chars)
    if not proof.startswith(_STARTED) and not timed_out:
        raise RuntimeError(f"the sandbox did not start the program (exit status {returncode}):\n{text[-2000:]}")
    status, note = _status(returncode, timed_out, proof == _STARTED + secret)
    return Result(status, round(seconds, 3), text + note)


def _command(limits: Limits, key_fd: int, proof_fd: int) -> list[str]:
    cpu_s = math.ceil(limits.timeout_s) + 1
    numbers = (key_fd, proof_fd, limits.memory_bytes, cpu_s, limits.file_bytes, limits.open_files, limits.processes)
    return [*network_prefix(), sys.executable, "-I", "-c", _RUNNER, *map(str, numbers)]


def _execute(folder: str, output, limits: Limits, secret: bytes) -> tuple[int, bool, bytes]:
    """Run the runner on `folder` with `secret` on its key pipe; the exit status, whether the deadline passed,
    and what the runner wrote to its proof pipe."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
    key_r, key_w = os.pipe()
    proof_r, proof_w = os.pipe()
    try:
        os.write(key_w, secret)  # far below a pipe's capacity, so this does not block
        os.close(key_w)
        # Output goes to an unnamed file, not a pipe: a pipe could fill up and stall the child.
        proc = subprocess.Popen(_command(limits, key_r, proof_w), cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=(key_r, proof_w))
    except BaseException:
        os.close(proof_r)
        raise
    finally:
        for fd in (key_r, key_w, proof_w):
            _close(fd)
    try:
        returncode, timed_out = proc.wait(timeout=limits.timeout_s), False
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc.pid)  # also reaps whatever the code started in the background
    if timed_out:
        returncode = proc.wait()
    return returncode, timed_out, _drain(proof_r)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # already closed


def _drain(fd: int, wait_s: float = 2.0, most: int = 4096) -> bytes:
    """What the pipe `fd` holds once every writer is gone (or `wait_s` passed, or `most` bytes came); closes it."""
    data, deadline = b"", time.monotonic() + wait_s
    try:
        while len(data) <= most:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data


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


def _signal_name(returncode: int) -> str | None:
    """The signal that ended the runner: a negative status, or bubblewrap's 128 + n."""
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        return signal.Signals(number).name if number else None
    except ValueError:
        return None


def _status(returncode: int, timed_out: bool, proven: bool) -> tuple[str, str]:
    if proven:
        return "passed", ""
    name = _signal_name(returncode)
    if timed_out or name == "SIGXCPU":
        return "timeout", ""
    if returncode == _MEMORY:
        return "memory", ""
    if returncode == _COMPILE:
        return "error", ""
    if name is not None:
        return "error", f"\nkilled by {name}"
    if returncode in (1, _EARLY_EXIT):
        return "failed", ""
    return "failed", f"\nexited with code {returncode} before the tests finished"
