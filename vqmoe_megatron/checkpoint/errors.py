"""The error every checkpoint reader and writer raises (light: the CLIs import it before torch)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says what to do."""
