"""Lines the real-shape tests want in pytest's terminal summary (peak memory, times).

tests/conftest.py prints them in `pytest_terminal_summary`, so they appear in CI's log
without -s.
"""

from __future__ import annotations

LINES: list[str] = []


def record(line: str) -> None:
    LINES.append(line)
