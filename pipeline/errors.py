"""The two kinds of error every ``pipeline`` exception is one of.

``UsageError`` (exit 2): the request is wrong (a recipe key, an argument, a missing file or model); nothing ran
that needs undoing, and the message says what to change. ``JobFailed`` (exit 1): the request was fine, the job
ran and failed (a contract broken, a model that does not fit, a verification that did not pass).

``cli.main`` maps these two, and only these, to exit codes; any other exception is a bug and keeps its
traceback. Each error renders itself as one or more ``error:`` lines (``lines()``), so the mapping needs no
knowledge of the stage that raised it.
"""

from __future__ import annotations


class UsageError(Exception):
    """The request is wrong: exit code 2."""

    exit_code = 2

    def lines(self) -> list[str]:
        """What ``cli.main`` prints, one ``error:`` line each."""
        return [str(self)]


class JobFailed(Exception):
    """The job ran and failed: exit code 1."""

    exit_code = 1

    def lines(self) -> list[str]:
        """What ``cli.main`` prints, one ``error:`` line each."""
        return [str(self)]
