"""What every command-line bad-input test checks: one ``error: ...`` line, the user-error exit status, no traceback."""

from __future__ import annotations

import subprocess

from policy_accel.errors import EXIT_USER_ERROR


def one_error_line(run: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one line on stderr, ``error: ...``, and no traceback anywhere."""
    assert run.returncode == EXIT_USER_ERROR, (run.returncode, run.stderr[-3000:])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout
    return lines[0]
