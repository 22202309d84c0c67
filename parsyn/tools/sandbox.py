"""Run untrusted Python (model-written solutions plus their tests, or an agent's program) isolated by bubblewrap.

    result = run(solution + "\\n" + tests, limits=Limits(timeout_s=5))
    result.status  # "passed" | "failed" | "timeout" | "memory" | "error"

What a run guarantees and how; in brackets the tests (tests/test_sandbox.py, `test_` left off) that check it:

- "passed" is proven, never read from an exit status the code controls: the parent makes a secret per run
  (`secrets.token_hex`) and hands it over an inherited pipe that the runner reads and closes before the code
  runs; only once `exec` of the program has returned does the runner write it to a second pipe, and "passed"
  needs exactly that there. Otherwise: "failed" (raised, or exited early), "timeout" (deadline or CPU limit),
  "memory" (MemoryError under the address-space limit), "error" (did not compile, or died from a signal).
  [a_pass_cannot_be_faked_by_the_exit_path, exiting_before_the_tests_finish_does_not_pass, passing_and_failing_
  code, code_that_does_not_compile_is_an_error, death_by_a_signal_is_an_error; timeout and memory below]
- No process outlives the run: the code runs in its own pid namespace under bubblewrap's init, which dies with
  bubblewrap (`--die-with-parent`); the kernel kills every process in a namespace whose init died, new sessions
  and double forks included. At the deadline bubblewrap's process group is killed.
  [background_processes_are_killed, processes_in_new_sessions_die_with_the_sandbox, infinite_loop_times_out...]
- No network, no way into ours: a new network namespace with only loopback, inside a new user namespace, so the
  code holds no capability outside it and cannot enter another namespace (setns, nsenter); it cannot see our
  processes either (fresh /proc), nor make user namespaces of its own; `socket` is also disabled in Python.
  [network_namespace_has_only_loopback, the_network_namespace_cannot_be_left, sockets_are_refused]
- A read-only system: / read-only, fresh /proc and /dev (read-only; /dev/null and the like work), empty read-only
  /tmp and /run (the host's sockets and other runs' folders out of sight). Its one writable place is its working
  folder, a tmpfs of `Limits.folder_bytes` holding solution.py, gone with the run. As root, the code runs as
  nobody (65534) without capabilities and with no-new-privs (setpriv), so it reads only what any user may; an
  interpreter under a folder others cannot enter (pyenv in /root) is bound back into an empty tmpfs over it.
  [the_file_system_is_read_only_but_for_the_folder, the_folder_holds_at_most_folder_bytes, fresh_folder_...]
- Limits: address space, CPU seconds, file size (its output too), open files, and processes and threads
  (RLIMIT_NPROC, counted in the run's own user namespace, and enforced because the code is never host root),
  the deadline; `python -I` and a minimal environment (PATH, HOME, TMPDIR, LANG).
  [unbounded_memory_is_reported_as_memory, threads_burning_cpu_time_out, output_past_the_file_limit_fails_...,
  a_fork_bomb_is_contained_and_ends_at_the_deadline, fresh_folder_is_removed_and_environment_is_minimal]
- The output is stdout and stderr together in the order written (`python -u`), its last `Limits.output_chars`
  kept. [output_is_a_bounded_tail; tests/test_tools.py: python_tool_output_keeps_the_order_written]
- `run` never raises for what the code does, to its folder or otherwise; it raises TypeError for code that is
  not str, and RuntimeError naming what is missing where bubblewrap (or setpriv, as root) is missing or cannot
  isolate here: it never runs code unisolated.
  [what_the_code_does_to_its_folder_never_raises, without_bubblewrap_the_sandbox_refuses_to_run]

Not guaranteed. The code and the harness share one interpreter: the secret sits in the runner's frame while the
code runs, so code that deliberately inspects its interpreter (frames, `gc`, ctypes, /proc/self/mem) can find it,
or call the runner's finishing function, and forge a pass; so can code that makes its tests vacuous (objects
equal to everything, `sys.settrace` skipping asserts, patched builtins the tests call). Closing that needs the
tests in another process than the solution. The code reads whatever any user may read on the host. CPU and
memory limits hold per process (up to `Limits.processes` of them until the deadline), not per run as a cgroup
would; the folder's tmpfs counts against the machine's memory, not the address-space limit.
"""

from __future__ import annotations

import math
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

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

_write = os.write

def _no_network(*args, **kwargs):
    raise OSError("network disabled in sandbox")

def _quietly(action):
    try:
        action()
    except MemoryError:
        _write(2, b"MemoryError\n")
    except BaseException:
        pass  # output past the file-size limit, or streams the code replaced; the status still tells

def _main():
    import builtins, resource, socket, traceback, types, _socket
    key_fd, proof_fd, memory, cpu, fsize, nofile, nproc = map(int, sys.argv[1:8])
    sys.argv[:] = ["solution.py"]
    os.environ.pop("PWD", None)  # bubblewrap's, set after our minimal environment
    key = b""
    while chunk := os.read(key_fd, 256):
        key += chunk
    os.close(key_fd)
    os.closerange(3, proof_fd)  # whatever else came along (bubblewrap passes descriptors on)
    os.closerange(proof_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    os.set_inheritable(proof_fd, False)
    write, exit_, show_error, out, err = os.write, os._exit, traceback.print_exception, sys.stdout, sys.stderr
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
    socket.socket = socket.create_connection = socket.getaddrinfo = socket.fromfd = _socket.socket = _no_network

    def finish(code, show=True):
        if show:
            _quietly(lambda: show_error(*sys.exc_info()[:2], sys.exc_info()[2].tb_next, file=err))  # the code's frames
        for stream in (sys.stdout, sys.stderr, out, err):
            _quietly(lambda: stream.flush())
        if code is None:  # the program returned: prove it
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
    folder_bytes: int = 64 * 2**20     # size of its working folder, a tmpfs: all it may write but its output
    output_chars: int = 4000           # tail of stdout+stderr kept in the result

    def __post_init__(self):
        for name in ("timeout_s", "memory_bytes", "file_bytes", "open_files", "processes", "folder_bytes",
                     "output_chars"):
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


_NOBODY = 65534  # the uid and gid the code runs as when we are root
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


@lru_cache(maxsize=None)
def isolation() -> tuple[str, ...]:
    """The isolation tools (bubblewrap, and util-linux's setpriv when we are root), checked once per process by
    isolating `python -I -c pass`. Raises RuntimeError naming what is missing: code never runs without them."""
    names = ("bwrap", "setpriv") if os.geteuid() == 0 else ("bwrap",)
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise RuntimeError(f"the code sandbox needs {' and '.join(missing)} to isolate model-written code and does "
                           "not run it without (Debian: apt-get install bubblewrap, or make install)")
    tools = tuple(found.values())
    with tempfile.TemporaryDirectory(prefix="parsyn-sandbox-") as folder, tempfile.TemporaryFile() as source:
        command = [*_isolated(tools, folder, source.fileno(), 2**20), sys.executable, "-I", "-c", "pass"]
        probe = subprocess.run(command, cwd=folder, env=_ENV, stdin=subprocess.DEVNULL, capture_output=True,
                               pass_fds=(source.fileno(),), umask=0o022, timeout=60)
    if probe.returncode != 0:
        raise RuntimeError(f"bubblewrap cannot isolate code on this machine (exit status {probe.returncode}): "
                           f"{probe.stderr.decode(errors='replace').strip()}")
    return tools


def _isolated(tools: tuple[str, ...], folder: str, source_fd: int, folder_bytes: int) -> list[str]:
    """The command prefix that runs a program in new user, pid, network, ipc, uts and cgroup namespaces (no
    capabilities outside them, only loopback, no more user namespaces), with / read-only, fresh /proc and /dev,
    empty read-only /tmp and /run (no host sockets), and at `folder`, its working folder and the only place it
    may write, a tmpfs of `folder_bytes` holding solution.py (copied from `source_fd`)."""
    variables = {**_ENV, "HOME": folder, "TMPDIR": folder}
    env = [arg for name, value in variables.items() for arg in ("--setenv", name, value)]
    inner = [tools[0], "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
             "--ro-bind", "/", "/", "--size", "65536", "--tmpfs", "/tmp", "--size", "65536", "--tmpfs", "/run",
             *_interpreter_back(), "--size", str(folder_bytes), "--tmpfs", folder, "--file", str(source_fd),
             f"{folder}/solution.py", "--remount-ro", "/tmp", "--remount-ro", "/run",
             "--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc", "--chdir", folder, "--clearenv", *env, "--"]
    if len(tools) == 1:  # not root: the code runs as our own user, in its own user namespace
        return inner
    # As root: first a private mount namespace where the interpreter is reachable for the unprivileged user,
    # then that user with no capabilities, no way to gain privileges, killed if this wrapper dies.
    drop = [tools[1], f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups", "--no-new-privs",
            "--pdeathsig=KILL", "--"]
    return [tools[0], "--dev-bind", "/", "/", "--die-with-parent", *_interpreter_binds(), "--", *drop, *inner]


def _interpreter_folders() -> set[str]:
    folders = (os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(sys.executable), sys.prefix,
               sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    return {os.path.realpath(p) for p in folders if os.path.isdir(p)} | {p for p in folders if os.path.isdir(p)}


def _interpreter_back() -> list[str]:
    """Read-only binds of the interpreter's folders that lie under the emptied /tmp or /run (a virtual
    environment made in /tmp, say), so the interpreter still runs there."""
    hidden = [p for p in sorted(_interpreter_folders()) if Path(p).is_relative_to("/tmp") or
              Path(p).is_relative_to("/run")]
    return [arg for p in hidden for arg in ("--ro-bind", p, p)]


def _interpreter_binds() -> list[str]:
    """bwrap arguments that make this interpreter reachable for other users when it lies under a folder they
    cannot enter (pyenv under /root, say): a tmpfs over that folder with the interpreter's folders bound back."""
    needed = {os.path.realpath(p) for p in _interpreter_folders()}
    args: list[str] = []
    bound: list[Path] = []
    hidden: set[Path] = set()
    for path in sorted(map(Path, needed)):
        ancestors = [a for a in reversed(path.parents) if a != Path("/")]
        closed = next((a for a in ancestors if not os.stat(a).st_mode & stat.S_IXOTH), None)
        if closed is None or any(b == path or b in path.parents for b in bound):
            continue
        if closed not in hidden:
            args += ["--tmpfs", str(closed)]
            hidden.add(closed)
        for folder in ancestors[ancestors.index(closed) + 1:]:
            args += ["--perms", "0755", "--dir", str(folder)]
        args += ["--ro-bind", str(path), str(path)]
        bound.append(path)
    return args


def run(code: str, *, limits: Limits = Limits()) -> Result:
    """Run `code` as a Python program in a fresh temporary folder under `limits`; never raises for what the
    code does, never leaves its processes or files behind."""
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    tools = isolation()
    secret = secrets.token_hex(32).encode()
    with tempfile.TemporaryDirectory(prefix="parsyn-sandbox-", ignore_cleanup_errors=True) as folder, \
            tempfile.TemporaryFile() as source, tempfile.TemporaryFile() as output:
        source.write(code.encode("utf-8", errors="surrogatepass"))  # a lone surrogate fails to compile, in there
        source.flush()
        source.seek(0)
        prefix = _isolated(tools, folder, source.fileno(), limits.folder_bytes)
        start = time.monotonic()
        returncode, timed_out, proof = _execute(prefix, source.fileno(), folder, output, limits, secret)
        seconds = time.monotonic() - start
        text = _tail(output, limits.output_chars)
    if not proof.startswith(_STARTED) and not timed_out:
        raise RuntimeError(f"the sandbox did not start the program (exit status {returncode}):\n{text[-2000:]}")
    status, note = _status(returncode, timed_out, proof == _STARTED + secret)
    return Result(status, round(seconds, 3), text + note)


def _command(prefix: list[str], limits: Limits, key_fd: int, proof_fd: int) -> list[str]:
    cpu_s = math.ceil(limits.timeout_s) + 1
    numbers = (key_fd, proof_fd, limits.memory_bytes, cpu_s, limits.file_bytes, limits.open_files, limits.processes)
    # -u: stdout unbuffered like stderr, so the two interleave in the output as the code wrote them
    return [*prefix, sys.executable, "-I", "-u", "-c", _RUNNER, *map(str, numbers)]


def _execute(prefix: list[str], source_fd: int, folder: str, output, limits: Limits,
             secret: bytes) -> tuple[int, bool, bytes]:
    """Run the runner isolated by `prefix` (which reads `source_fd`) in `folder` with `secret` on its key pipe;
    the exit status, whether the deadline passed, and what the runner wrote to its proof pipe."""
    key_r, key_w = os.pipe()
    os.write(key_w, secret)  # far below a pipe's capacity, so this does not block
    os.close(key_w)
    try:
        proof_r, proof_w = os.pipe()
        try:
            # Output goes to an unnamed file, not a pipe: a pipe could fill up and stall the child.
            proc = subprocess.Popen(_command(prefix, limits, key_r, proof_w), cwd=folder, env=_ENV,
                                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                    start_new_session=True, pass_fds=(source_fd, key_r, proof_w), umask=0o022)
        except BaseException:
            os.close(proof_r)
            raise
        finally:
            os.close(proof_w)  # the runner holds the only write end now
    finally:
        os.close(key_r)
    try:
        returncode, timed_out = proc.wait(timeout=limits.timeout_s), False
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc.pid)  # also reaps whatever the code started in the background
    if timed_out:
        returncode = proc.wait()
    return returncode, timed_out, _drain(proof_r)


def _drain(fd: int, wait_s: float = 2.0, most: int = 4096) -> bytes:
    """What the pipe `fd` holds once every writer is gone (or `wait_s` passed, or `most` bytes came); closes it."""
    data, deadline, poller = b"", time.monotonic() + wait_s, select.poll()  # poll: any fd number, unlike select
    poller.register(fd, select.POLLIN)
    try:
        while len(data) <= most:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
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
