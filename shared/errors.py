"""The one base class of expected errors: a bad config, bad data, a refusal, a failed run.

An expected error is the operator's to fix, and its message names the key, file or site, so
the command line prints it as one line and exits 2 (fedbreast/cli.py). Every other exception
is a bug in fedbreast or a library, and keeps its traceback. The concrete classes live where
they are raised (``ConfigError`` in shared/data/rules.py, ``DeployError`` in
server/superlink.py, ...) and keep their ``ValueError`` / ``RuntimeError`` base, so code that
catches those still does.
"""

from __future__ import annotations


class FedbreastError(Exception):
    """An expected error whose message tells the operator what to fix."""
