"""The errors the `lance-pipeline` command line reports as one line with exit code 2.

`UsageError` is a mistake in how a command was called (conflicting options, a work directory the
command must not touch, a malformed prompts file). `USER_ERRORS` lists every typed error that is
the user's to fix, by module and class name: the CLI looks them up in `sys.modules` when an error
reaches it, so listing them imports nothing (an error class whose module never loaded cannot have
been raised). Anything else is a bug or an infrastructure failure and keeps its traceback.
"""
from __future__ import annotations

import sys

# (module, class): config values, named input files, the cluster address, checkpoints, OCR setup,
# curation sources and datasets, shard versions, RL prompts, VAE weights, command usage.
USER_ERRORS: tuple[tuple[str, str], ...] = (
    ("builtins", "FileNotFoundError"),
    ("lance_model.configio", "ConfigError"),
    ("lance_platform.runtime", "RayUnavailableError"),
    ("lance_model.checkpoint", "CheckpointError"),
    ("rl.ocr", "OcrEngineUnavailable"),
    ("data_curation.sources", "SourceError"),
    ("data_curation.store", "DatasetMismatchError"),
    ("lance_platform.schema", "SchemaVersionError"),
    ("rl.rewards", "PromptError"),
    ("lance_model.encoders.vae", "VaeWeightsError"),
    ("jobs.errors", "UsageError"),
)


class UsageError(Exception):
    """A command was called in a way it cannot run; the message says what to change."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """The classes of `USER_ERRORS` whose modules are loaded."""
    found = []
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, user_error_types())
