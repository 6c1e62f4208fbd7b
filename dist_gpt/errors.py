"""Errors a user can cause, and every other refusal. Each message is one line that names the file or
option and the fix.

Entry points end through `dist.run_main`, which turns any `Refusal` into `error: <message>`,
printed once per launch, recorded for torchrun, and the refusal's exit status (`dist.refuse`), so
a user never sees a traceback from deep inside torch for a mistake in their input.
"""


class Refusal(Exception):
    """Base class of every error an entry point ends with in one line (see `dist.refuse`).

    A new kind of refusal (a hang, an out-of-memory) subclasses this, or UserError when the user's
    input caused it, and sets its own `exit_code`."""

    exit_code = 1


class UserError(Refusal):
    """A problem with the user's input (flag, file, dataset, checkpoint): exit status 2."""

    exit_code = 2


class ConfigError(UserError):
    """A bad option, preset, TOML file or combination of settings."""


class DataError(UserError):
    """A missing, corrupt or mismatched dataset, shard or tokenizer."""


class CheckpointError(UserError):
    """A missing, incomplete, corrupt, unsafe or incompatible checkpoint."""


class OutOfMemory(UserError):
    """A step ran out of device memory; the message names the options that would fit (dist_gpt.training.oom)."""

    exit_code = 5


class Hang(Refusal):
    """A rank's own step made no progress for train.hang_timeout_s (dist_gpt/training/watchdog.py): its stacks
    are on file, and the watchdog thread ends the process with this status."""

    exit_code = 6


class PeerLost(Refusal):
    """A collective failed or timed out because another rank went away (exit status 4); the heartbeat
    (dist_gpt.training.faults) names it."""

    exit_code = 4
