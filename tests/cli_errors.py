"""What every command-line bad-input test checks: one ``error: ...`` line, the user-error exit status, no traceback;
and what a test that sends a command Ctrl-C starts it with."""

from __future__ import annotations

import signal
import subprocess

from policy_accel.errors import EXIT_USER_ERROR


def one_error_line(run: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one line on stderr, ``error: ...``, and no traceback anywhere."""
    assert run.returncode == EXIT_USER_ERROR, (run.returncode, run.stderr[-3000:])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout
    return lines[0]


def default_sigint() -> None:
    """``preexec_fn`` of a child that is sent Ctrl-C: started by a pytest running in the background (``pytest ... &``)
    it would inherit an ignored SIGINT and never see it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
