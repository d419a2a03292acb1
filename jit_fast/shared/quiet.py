"""Silence a dependency's notice that a user cannot act on and that breaks one-line CLI output."""

import contextlib
import logging
from collections.abc import Iterator

# torchao 0.18 registers its Enums with torch's pytree on import, which torch 2.14 logs as a deprecation warning
PYTREE_LOGGER = "torch.utils._pytree"
# inductor's CPU compile looks for a CUDA runtime and logs that it found none (it needs none)
CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the loggers `names` to ERROR for the block, then restore their levels."""
    logs = [logging.getLogger(n) for n in names]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def quiet_pytree_notices() -> contextlib.AbstractContextManager[None]:
    """Quiet torch's pytree logger: for importing torchao, or transformers loading a model (which imports it)."""
    return quiet_loggers(PYTREE_LOGGER)
