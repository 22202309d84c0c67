"""The code sandbox, with real subprocesses: outcomes, limits, cleanup, isolation."""

from __future__ import annotations

import errno
import os
import resource
import secrets
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from parsyn.tools import sandbox as S
from parsyn.tools.sandbox import STATUSES, Limits, Result, isolation, run

FAST = Limits(timeout_s=5.0)


def test_passing_and_failing_code():
    passed = run("assert sum(range(5)) == 10\nprint('ok')", limits=FAST)
    assert (passed.status, passed.output, passed.passed) == ("passed", "ok\n", True) and 0 < passed.seconds < 5
    failed = run("def f():\n    return 1\nassert f() == 2, 'f is wrong'", limits=FAST)
    assert failed.status == "failed"
    assert "AssertionError: f is wrong" in failed.output and 'File "solution.py", line 3' in failed.output


def test_code_that_does_not_compile_is_an_error():
    result = run("def f(:\n    pass", limits=FAST)
    assert result.status == "error" and "SyntaxError" in result.output


def test_death_by_a_signal_is_an_error():
    result = run("import os, signal\nprint('before', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)", limits=FAST)
    assert result.status == "error" and result.output == "before\n\nkilled by SIGSEGV", result


def test_exiting_before_the_tests_finish_does_not_pass():
    for code in ("import sys\nsys.exit(0)\nassert False", "import os\nos._exit(0)\nassert False"):
        result = run(code, limits=FAST)
        assert result.status == "failed", (code, result)
        assert "before the tests finished" in result.output


def test_infinite_loop_times_out_within_the_limit():
    start = time.monotonic()
    result = run("while True:\n    pass", limits=Limits(timeout_s=1.5))
    assert result.status == "timeout"
    assert 1.5 <= result.seconds < 4.0 and time.monotonic() - start < 6.0  # kill and cleanup are prompt


def test_threads_burning_cpu_time_out():
    code = ("import threading, time\ndef burn():\n    while True:\n        pass\n"
            "for _ in range(3):\n    threading.Thread(target=burn, daemon=True).start()\ntime.sleep(60)")
    assert run(code, limits=Limits(timeout_s=1.5)).status == "timeout"


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"])
def test_unbounded_memory_is_reported_as_memory(code):
    result = run(code, limits=Limits(timeout_s=20.0, memory_bytes=256 * 2**20))
    assert result.status == "memory", result
    assert "MemoryError" in result.output


def test_memory_under_the_limit_is_fine():
    assert run("x = bytearray(50 * 2**20)\nassert len(x) == 50 * 2**20", limits=FAST).status == "passed"


def test_sockets_are_refused():
    code = ("import socket\n"
            "for make in (lambda: socket.socket(), lambda: socket.create_connection(('127.0.0.1', 9))):\n"
            "    try:\n        make()\n    except OSError as exc:\n        print(exc)\n"
            "    else:\n        raise SystemExit('connected')")
    result = run(code, limits=FAST)
    assert result.status == "passed", result
    assert result.output.count("network disabled in sandbox") == 2


def test_network_namespace_has_only_loopback():
    result = run("print(sorted(line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]))",
                 limits=FAST)
    assert result.status == "passed" and result.output.strip() == "['lo']", result


def test_fresh_folder_is_removed_and_environment_is_minimal():
    result = run("import os\nopen('litter.txt', 'w').write('x')\nprint(os.getcwd())\nprint(sorted(os.environ))",
                 limits=FAST)
    folder, names = result.output.splitlines()
    assert result.status == "passed"
    assert Path(folder).name.startswith("parsyn-sandbox-") and not Path(folder).exists()
    assert set(eval(names)) <= {"HOME", "LANG", "PATH", "TMPDIR", "LC_CTYPE"}


def test_the_code_holds_only_standard_streams_and_the_proof_pipe():
    result = run("import os\nfds = os.listdir('/proc/self/fd')\nprint(sorted(int(fd) for fd in fds))", limits=FAST)
    descriptors = eval(result.output)  # the listing's own descriptor comes and goes with it
    assert result.status == "passed" and descriptors[:3] == [0, 1, 2] and len(descriptors) == 5, result


def test_background_processes_are_killed():
    marker = _marker()
    try:
        assert run(f"import subprocess\np = subprocess.Popen(['sleep', '{marker}'])", limits=FAST).status == "passed"
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and _pids_with(marker):
            time.sleep(0.05)
        assert _pids_with(marker) == []
    finally:
        _kill_all(marker)


def _running(pid: int) -> bool:
    """Alive and not a zombie (this container's init does not reap orphans)."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return "zombie" not in state


def test_output_is_a_bounded_tail():
    result = run("for i in range(100000):\n    print(i)", limits=Limits(timeout_s=10.0, output_chars=50))
    assert result.status == "passed" and len(result.output) <= 50 and result.output.endswith("99999\n")


def test_output_past_the_file_limit_fails_without_hanging():
    result = run("print('x' * 10**8)", limits=Limits(timeout_s=10.0, file_bytes=2**20))
    assert result.status == "failed" and len(result.output) <= Limits().output_chars


def test_invalid_limits_and_results_raise_naming_the_value():
    with pytest.raises(ValueError, match="timeout_s.*-1"):
        Limits(timeout_s=-1)
    with pytest.raises(ValueError, match="'crashed'"):
        Result("crashed", 0.0, "")
    with pytest.raises(TypeError, match="bytes"):
        run(b"print(1)")



# ---------------------------------------------------------------- hostile programs

FAKE_PASSES = {
    "exit with the runner's old success code": "import os\nos._exit(86)\nassert False",
    "patched traceback printing": "import os, traceback\ntraceback.print_exception = lambda *a, **k: os._exit(86)\n"
                                  "assert False",
    "patched os._exit": "import os\nreal = os._exit\nos._exit = lambda code: real(86)\nassert False",
    "patched sys.exit and os._exit": "import os, sys\nreal = os._exit\nsys.exit = os._exit = lambda *a: real(86)\n"
                                     "raise SystemExit(1)",
    "stderr that exits": "import os, sys\nclass Out:\n    def write(self, s):\n        os._exit(86)\n"
                         "    def flush(self):\n        pass\nsys.stderr = Out()\nassert False",
    "guessed proof on every descriptor": "import os\nfor fd in range(3, 64):\n    try:\n"
                                         "        os.write(fd, b'+' + b'0' * 64)\n    except OSError:\n"
                                         "        pass\nos._exit(0)",
}


@pytest.mark.parametrize("code", FAKE_PASSES.values(), ids=FAKE_PASSES.keys())
def test_a_pass_cannot_be_faked_by_the_exit_path(code):
    result = run(code, limits=FAST)
    assert result.status == "failed", result


def _marker() -> str:
    """A `sleep` argument no other process uses, to find what a sandboxed program left running."""
    return f"{60 + secrets.randbelow(10**6) / 10**7:.7f}"


def _pids_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in entry.joinpath("cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in pids if _running(pid)]


def _kill_all(marker: str) -> None:
    for pid in _pids_with(marker):
        os.kill(pid, signal.SIGKILL)


def test_processes_in_new_sessions_die_with_the_sandbox():
    new_session, double_fork = _marker(), _marker()
    code = (f"import os, subprocess, time\nsubprocess.Popen(['sleep', '{new_session}'], start_new_session=True)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            f"        os.execvp('sleep', ['sleep', '{double_fork}'])\n    os._exit(0)\ntime.sleep(0.3)")
    try:
        assert run(code, limits=FAST).status == "passed"
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and (_pids_with(new_session) or _pids_with(double_fork)):
            time.sleep(0.05)
        assert _pids_with(new_session) == [] and _pids_with(double_fork) == []
    finally:
        _kill_all(new_session)
        _kill_all(double_fork)


ESCAPE = """
import ctypes, glob, os, subprocess, sys
connect = "import socket; socket.create_connection(('127.0.0.1', PORT), timeout=1); print('REACHED')"
def attempt(*prefix):
    subprocess.run([*prefix, sys.executable, "-I", "-c", connect], stderr=subprocess.DEVNULL, timeout=3)
for target in [f"/proc/{os.getppid()}/ns/net", "/proc/HOST/ns/net", *glob.glob("/proc/*/ns/net")]:
    attempt("nsenter", f"--net={target}")
    try:
        fd = os.open(target, os.O_RDONLY)
    except OSError:
        continue
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) == 0:  # CLONE_NEWNET
        attempt()
attempt()
if subprocess.run(["unshare", "--user", "--map-root-user", "--net", "true"], stderr=subprocess.DEVNULL).returncode == 0:
    print("NEW USER NAMESPACE")
"""


def test_the_network_namespace_cannot_be_left():
    """Entering another network namespace (the parent's, found through /proc) must not reach our loopback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        code = ESCAPE.replace("PORT", str(listener.getsockname()[1])).replace("HOST", str(os.getpid()))
        result = run(code, limits=Limits(timeout_s=20.0))
        with pytest.raises(BlockingIOError):
            listener.accept()[0].close()
    assert result.status == "passed", result
    assert "REACHED" not in result.output and "NEW USER NAMESPACE" not in result.output, result


def test_the_file_system_is_read_only_but_for_the_folder():
    """Host folders root may write are closed to the code; its own folder and /dev/null are open; the host's /tmp
    (sockets, other runs' folders) is out of sight."""
    token = secrets.token_hex(8)
    canaries = [Path("/var/tmp") / f"parsyn-canary-{token}", Path(sys.executable).parent / f".canary-{token}",
                Path("/etc") / f"parsyn-canary-{token}"]
    code = ("import os\n"
            f"for path in {[str(c) for c in canaries]!r}:\n"
            "    try:\n        open(path, 'w').write('x')\n    except OSError as exc:\n        print(exc.errno)\n"
            "open('mine.txt', 'w').write('x')\nopen('/dev/null', 'w').write('x')\n"
            "print(os.getcwd())\nprint(os.listdir('/tmp'))")
    try:
        result = run(code, limits=FAST)
        assert result.status == "passed", result
        assert not any(c.exists() for c in canaries)
        *errors, folder, tmp = result.output.splitlines()
        assert errors == [str(errno.EROFS)] * 3, result
        # only its own folder, and the way to an interpreter that lies under /tmp (a virtual environment there)
        ways = {Path(p).relative_to("/tmp").parts[0] for p in S._interpreter_folders()
                if Path(p).is_relative_to("/tmp")}
        assert set(eval(tmp)) <= {Path(folder).name} | ways, result
    finally:
        for canary in canaries:
            canary.unlink(missing_ok=True)


def test_the_folder_holds_at_most_folder_bytes():
    code = ("import errno\nwritten = 0\ntry:\n    for i in range(64):\n        with open(f'f{i}', 'wb') as fh:\n"
            "            fh.write(bytes(2**20))\n        written += 2**20\nexcept OSError as exc:\n"
            "    assert exc.errno == errno.ENOSPC, exc\nprint(written)")
    result = run(code, limits=Limits(timeout_s=5.0, folder_bytes=8 * 2**20))
    assert result.status == "passed" and int(result.output) < 8 * 2**20, result


def test_a_fork_bomb_is_contained_and_ends_at_the_deadline():
    """A bounded bomb (255 forks without a limit) that reports each fork that worked, then waits forever."""
    code = ("import os, time\nfor _ in range(8):\n    try:\n        if os.fork() == 0:\n"
            "            os.write(1, b'f')\n    except OSError:\n        pass\ntime.sleep(60)")
    start = time.monotonic()
    result = run(code, limits=Limits(timeout_s=2.0))
    assert result.status == "timeout" and time.monotonic() - start < 6.0
    assert 0 < result.output.count("f") < Limits().processes, result


REPLACERS = {
    "folder replaced by a file": "import os, shutil\nd = os.getcwd()\nos.chdir('/')\nshutil.rmtree(d)\n"
                                 "open(d, 'w').write('x')",
    "folder deleted": "import os, shutil\nd = os.getcwd()\nos.chdir('/')\nshutil.rmtree(d)",
    "solution.py replaced by a folder": "import os\nos.remove('solution.py')\nos.mkdir('solution.py')\n"
                                        "open('solution.py/x', 'w').write('x')\nos.chmod('solution.py', 0)",
}


@pytest.mark.parametrize("code", REPLACERS.values(), ids=REPLACERS.keys())
def test_what_the_code_does_to_its_folder_never_raises(code):
    result = run("import os\nprint(os.getcwd(), flush=True)\n" + code, limits=FAST)
    assert isinstance(result, Result) and result.status in STATUSES
    assert not os.path.lexists(result.output.splitlines()[0])


def test_runs_while_we_hold_descriptors_past_1024():
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("the open-file limit is below 1200 here")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert run("assert 2 + 2 == 4", limits=FAST).status == "passed"
    finally:
        for fd in held:
            os.close(fd)


def test_without_bubblewrap_the_sandbox_refuses_to_run(monkeypatch):
    isolation.cache_clear()
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    try:
        with pytest.raises(RuntimeError, match="needs bwrap"):
            run("print('unisolated')", limits=FAST)
    finally:
        monkeypatch.undo()
        isolation.cache_clear()
    assert run("print('isolated')", limits=FAST).output == "isolated\n"
