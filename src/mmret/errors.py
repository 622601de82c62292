"""Exceptions raised by mmret. Every message names the input and what is wrong with it."""


class MmretError(Exception):
    """Base class of every error mmret raises on purpose."""


class InputError(MmretError, ValueError):
    """An input (item, query, manifest line, argument) is malformed."""


class UnknownItemError(InputError):
    """An item id that is not in the index."""


class ImageLoadError(InputError):
    """An image could not be decoded safely (missing, corrupt, truncated, too large)."""


class IndexFormatError(MmretError):
    """An index folder is missing, corrupt, or written by an incompatible version."""


class IndexBusyError(MmretError):
    """Another writer holds the index; it was not touched."""


class RegistryError(MmretError, KeyError):
    """A registry lookup or registration failed (unknown or duplicate name)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
