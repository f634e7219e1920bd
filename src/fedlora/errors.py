"""The one error type of bad input, apart from config.py so that torch-only modules can raise it without pydantic."""


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the field or file."""
