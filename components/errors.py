"""Errors caused by the user's input: shown as one line, never as a traceback."""

import functools
import sys
from contextlib import contextmanager


class UserInputError(Exception):
    """Bad config or bad data. The message is the whole story: one line, naming the culprit."""


class ConfigError(UserInputError):
    pass


class DataError(UserInputError):
    pass


class StorageError(UserInputError):
    """A run's durable storage refused or failed (missing bucket, credentials, endpoint, checksum)."""


class ClusterError(UserInputError):
    """A Kubeflow Pipelines server could not be reached, or refused or failed a request (the message
    says what this submission created before it did, pipelines/kubeflow.py)."""


BRIEF_CHARS = 300


def brief(text: str, limit: int = BRIEF_CHARS) -> str:
    """The first line of an error's text, cut to about `limit` characters: at the end of its first
    sentence when that is long enough to say something, else at a word. Some library errors are one
    line of thousands of characters (torch lists every backend an operator has)."""
    line = (text.strip().splitlines() or [""])[0].strip()
    if len(line) <= limit:
        return line
    end = line.find(". ", 40, limit)
    if end != -1:
        return line[:end + 1]
    return line[:limit].rsplit(" ", 1)[0] + " ..."


# Printed by a failing step so that whoever ran it (a shell, kfp's local runner, a pod log)
# can pick the one-line reason out of the log.
ERROR_MARKER = "convergence-pipeline error:"


@contextmanager
def user_errors_as_one_line():
    """Inside a step: a user error prints one marked line and exits 2 (no traceback)."""
    try:
        yield
    except UserInputError as exc:
        print(f"{ERROR_MARKER} {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def exit_on_user_error(main):
    """Decorator for `python -m components.<step>` entry points."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with user_errors_as_one_line():
            return main(*args, **kwargs)

    return wrapper
