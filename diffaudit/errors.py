"""One error family. Every message says what went wrong and what to do; the CLI prints it on one line."""


class DiffauditError(Exception):
    """Base class: the CLI prints these as one line and exits with code 2."""

    exit_code = 2


class ConfigError(DiffauditError):
    """A config, suite or option is malformed or names something that does not exist."""


class SuiteError(ConfigError):
    """A prompt suite is unknown or malformed (the message names the file, line and field)."""


class NotARunError(DiffauditError):
    """A folder is not a diffaudit run folder."""


class RunLockedError(DiffauditError):
    """Another live process holds the run's lock."""


class SchemaError(DiffauditError):
    """A table does not match its schema (missing/extra columns, wrong types, wrong version)."""


class RegistryError(DiffauditError):
    """A plugin name is unknown or registered twice."""


class ModelError(DiffauditError):
    """A model could not be loaded (not found, offline, unsupported)."""


class InputError(DiffauditError):
    """A user-supplied file or value is unusable (missing, wrong size, wrong format)."""
