"""The code sandbox, with real subprocesses: outcomes, limits, cleanup, isolation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from parsyn.eval.sandbox import Limits, Result, network_prefix, run

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


def test_network_namespace_has_only_loopback_when_available():
    if not network_prefix():
        pytest.skip("unshare --net does not work on this machine; only the Python guard applies")
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


def test_background_processes_are_killed():
    result = run("import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid)", limits=FAST)
    pid = int(result.output.split()[0])
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.05)
    assert not _running(pid)


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
