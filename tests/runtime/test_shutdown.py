"""A stop while a stage is inside a long model call, in a real process: every frame is answered,
and the process exits with its own status instead of aborting (interpreter shutdown ends a
thread that is inside PyTorch's C++ code with pthread_exit, which aborts: exit 134 / -6)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.system  # every test here starts a program

SCRIPT = textwrap.dedent('''
    import sys, threading, torch
    from linewatch.commands import exit_now_if_a_stage_still_runs
    from linewatch.runtime.ops.logs import configure_logging
    from linewatch.config import LoggingConfig
    from tests.runtime.fakes import Collector, make_frame, make_pipeline

    inside = threading.Event()

    class BusyModel:
        backend, bank_id, bank_images, calibration = "fake", "bank-test", 1, None
        frame_size, colour_mode, sample_window, device = None, None, (0, 65535), "cpu"

        def __init__(self):
            self.stages = [("model", self.model)]

        def check_image(self, image, name):
            pass

        def model(self, images):
            inside.set()
            a = torch.randn(1500, 1500)
            while True:  # a model call that outlasts the stop (a CPU SAM takes seconds)
                a = (a @ a).tanh()

    collector = Collector()
    pipe = make_pipeline(BusyModel(), collector, max_delay_ms=0.0)
    pipe.start()
    pipe.submit(make_frame("cam0", 1))
    assert inside.wait(60)
    pipe.stop(timeout_s=0.2)
    print("answered", [(v.verdict, v.reason) for v in collector.verdicts], flush=True)
    print("running", pipe.running_after_stop(), flush=True)
    if sys.argv[1] == "exit-now":
        exit_now_if_a_stage_still_runs(pipe.running_after_stop(), 0, configure_logging(LoggingConfig(format="json")))
    print("normal interpreter exit", flush=True)
''')


def run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)


def test_stop_during_a_model_call_exits_cleanly_with_the_helper():
    done = run("exit-now")
    assert done.returncode == 0, done.stderr
    assert "answered [('timeout', 'shutdown')]" in done.stdout
    # the model stage still in its call (the decode stage may also not have seen the stop yet while
    # the model's matrix products hold both cores)
    [running] = [line for line in done.stdout.splitlines() if line.startswith("running ")]
    assert "'lw-stage-model'" in running and "lw-output" not in running, running
    assert "exit_with_stage_running" in done.stdout + done.stderr
    assert "normal interpreter exit" not in done.stdout


def test_without_the_helper_the_same_process_aborts():
    """The control: what `linewatch serve` did before (exit -6 after a clean stop)."""
    done = run("interpreter-exit")
    assert "normal interpreter exit" in done.stdout
    assert done.returncode in (-6, 134), (done.returncode, done.stderr[-500:])
