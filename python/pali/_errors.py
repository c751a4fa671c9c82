"""pali's exceptions. Every message is the library's own: the CLI, ``pali serve`` and the C
library refuse the same input with the same words."""


class Error(Exception):
    """Base class of every error pali raises."""


class ModelError(Error):
    """A model file is missing, unreadable, of the wrong kind, or does not match its partner."""


class ImageError(Error):
    """An image cannot be used: a missing, corrupt or unsupported file, or an array that is
    not uint8 pixels of shape (H, W, 3)."""


class PromptError(Error, ValueError):
    """The task cannot be run as asked (e.g. ``detect`` without object names)."""


class ContextLengthError(PromptError):
    """The prompt and the tokens to generate do not fit the context (``ctx_size``)."""


class OptionError(Error, ValueError):
    """An option is out of range (``max_tokens``, ``temperature``, ``top_k``, ``top_p``,
    ``stop``, ``ctx_size``, ``low_mem``, ...): the message names it and its value."""


class CancelledError(Error):
    """The generation was cancelled."""
