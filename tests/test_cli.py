"""The command line: user errors are one line on stderr with exit status 2 (`--debug` shows the
traceback), shipped files are not overwritten without --force, and Ctrl-C stops a long generation
within about a second."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _kvjax(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kvjax", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, **kw)


def test_version_and_python_dash_m():
    out = _kvjax("--version")
    assert out.returncode == 0 and out.stdout.startswith("kvjax ")


def test_a_user_error_is_one_line_and_exit_status_2(smollm2_dir):
    out = _kvjax("profile", "--total", "960", "--tokens", "20", "--output", "/tmp/kvjax_cli_test.json")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["kvjax profile: error: n_tokens must be at least 2 x window = 64 (the window's halves rank "
                     "and measure), got 20"], out.stderr
    debug = _kvjax("--debug", "profile", "--total", "960", "--tokens", "20", "--output", "/tmp/kvjax_cli_test.json")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_shipped_profile_is_not_overwritten_without_force():
    target = ROOT / "configs" / "budgets" / "smollm2-135m-1920.json"
    before = target.read_bytes()
    out = _kvjax("profile", "--total", "1920")
    assert out.returncode == 2 and "ships with kvjax" in out.stderr and "--force" in out.stderr
    assert target.read_bytes() == before


def test_bad_option_values_are_refused_by_the_parser():
    out = _kvjax("profile", "--total", "-5")
    assert out.returncode == 2 and "must be a positive int" in out.stderr


def test_ctrl_c_interrupts_a_long_generation_within_about_a_second(tmp_path):
    script = textwrap.dedent("""
        import signal, sys, time
        # a process started with SIGINT ignored (as a test runner's worker may be) keeps ignoring it:
        # Python then installs no KeyboardInterrupt handler, so install it here
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.path.insert(0, %r)
        import numpy as np, kvjax
        from test_generate import _tiny_params
        params = _tiny_params(max_position_embeddings=32768)
        kvjax.generate(params, [np.arange(1, 20, dtype=np.int32)], max_new_tokens=40)  # compile
        print("ready", flush=True)
        try:
            kvjax.generate(params, [np.arange(1, 20, dtype=np.int32)], max_new_tokens=30000)
            print("finished", flush=True)
        except KeyboardInterrupt:
            print("interrupted", time.perf_counter(), flush=True)
    """ % str(ROOT / "tests"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(2.0)  # well into the 30,000-token generation
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        line = proc.stdout.readline().split()
        assert line[0] == "interrupted", line
        assert float(line[1]) - sent < 2.0  # the loop runs in chunks of about half a second
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_swallowed_where_it_landed_still_ends_the_generation(monkeypatch):
    """Python raises KeyboardInterrupt wherever the main thread is; in a garbage-collector callback
    (JAX registers one) it is printed as "ignored" and dropped. The loop must still stop."""
    import numpy as np

    import kvjax
    from kvjax import loop
    from test_generate import _tiny_params

    params = _tiny_params()
    real_runner, calls = loop.runner, []

    def runner(batch):
        run = real_runner(batch)

        def chunk(*args, **kw):
            calls.append(1)
            if len(calls) == 2:  # the signal arrives and its exception dies in a callback
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    pass
            return run(*args, **kw)
        return chunk

    monkeypatch.setattr(loop, "runner", runner)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            kvjax.generate(params, [np.arange(1, 20, dtype=np.int32)], max_new_tokens=400)
            ended = "finished"
        except KeyboardInterrupt:
            ended = "interrupted"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handler is gone
    finally:
        signal.signal(signal.SIGINT, before)
    assert ended == "interrupted" and len(calls) == 2, (ended, len(calls))
