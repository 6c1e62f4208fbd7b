"""Errors a user can cause. Each message is one line that names the file or option and the fix.

Entry points catch `UserError`, print `error: <message>` and exit with status 2, so a user never
sees a traceback from deep inside torch for a mistake in their input. `PeerLost` is not the
user's doing: another rank went away (exit status 4; dist_gpt.training.faults names it).
"""


class UserError(Exception):
    """Base class: a problem with the user's input (flag, file, dataset, checkpoint)."""

    exit_code = 2


class ConfigError(UserError):
    """A bad option, preset, TOML file or combination of settings."""


class DataError(UserError):
    """A missing, corrupt or mismatched dataset, shard or tokenizer."""


class CheckpointError(UserError):
    """A missing, incomplete, corrupt, unsafe or incompatible checkpoint."""


class PeerLost(Exception):
    """A collective failed or timed out because another rank went away (exit status 4)."""

    exit_code = 4
