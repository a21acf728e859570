"""What XLA compiles inside a block: `with compiles() as names: ...` collects the names of the
jitted functions compiled there (from JAX's `jax_log_compiles` log lines)."""

from __future__ import annotations

import contextlib
import logging
import re

import jax


class _CompileLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"Finished XLA compilation of jit\((\w+)\)", record.getMessage())
        if m:
            self.names.append(m.group(1))


@contextlib.contextmanager
def compiles():
    handler = _CompileLog()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        yield handler.names
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(handler)
