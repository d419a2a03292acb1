"""Silence a dependency's import-time notice that a user cannot act on and that breaks one-line CLI errors."""

import contextlib
import logging
from collections.abc import Iterator

# torchao 0.18 registers its Enums with torch's pytree on import, which torch 2.14 logs as a deprecation warning
PYTREE_LOGGER = "torch.utils._pytree"


@contextlib.contextmanager
def quiet_pytree_notices() -> Iterator[None]:
    """Raise torch's pytree logger to ERROR for the block (importing torchao, or transformers loading a model,
    which imports it), then restore its level."""
    log = logging.getLogger(PYTREE_LOGGER)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
