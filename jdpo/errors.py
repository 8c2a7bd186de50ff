"""The one family of errors a user fixes by changing their input, not the code.

Every error raised for bad data, a bad config, a mesh that does not fit the devices, an unsupported or
damaged model checkpoint or an unusable run directory derives from `UserError`; its message names the
file and line, the config field or the path, and what to do. The `jdpo` command prints such an error
as one line and exits with `EXIT_USER_ERROR`, without a traceback (`--debug` or JDPO_DEBUG=1 shows it);
anything else is a bug and keeps its traceback. No imports: the command line loads this before JAX.
"""

EXIT_USER_ERROR = 2  # the same status argparse gives a bad command line
EXIT_UPLOAD_FAILED = 4  # the run finished and exported, the Hub upload (train.push_to_hub) failed


class UserError(Exception):
    """Bad input: the message names where (file and line, config field, path) and what to do."""


class ConfigError(UserError, ValueError):
    """A config value that is unknown, mistyped or inconsistent; the message names the field."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN / inf; the message names the step and the last good checkpoint."""


class DivergenceError(NonFiniteLossError):
    """The run blew up while still finite (loss or grad-norm spike, runaway weights); the message names
    the step, the value, the limit and its setting, and the last good checkpoint."""


class NoSpaceError(UserError):
    """The filesystem of the run's output is full, or too full to start: the message names the directory,
    the space a checkpoint takes and the space free there, and what was kept."""


class HubUploadError(RuntimeError):
    """The upload of a finished run's export to the Hugging Face Hub failed after its retries; the export
    is on disk and the message names it and how to upload it later. The `jdpo` command exits with
    `EXIT_UPLOAD_FAILED`; `result` is the run's `RunResult` (set by the loop)."""

    result = None


class ExportError(UserError):
    """The export after training failed (a full disk, a write error); the checkpoint it was made from is
    intact and the message says how to export again."""
