"""Prints how long each notebook took on each backend at the end of the run."""

from notebook_execution import RUN_TIMES


def pytest_terminal_summary(terminalreporter):
    if not RUN_TIMES:
        return
    terminalreporter.section("notebook run times")
    for (name, backend), seconds in sorted(RUN_TIMES.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        terminalreporter.write_line(f"{name:<40} {backend or 'auto':>5}  {seconds:6.1f} s")
