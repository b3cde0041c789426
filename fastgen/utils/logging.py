"""One logger tree for fastgen (``fastgen.*``), with ``set_verbosity`` and ``FASTGEN_VERBOSITY``."""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "fastgen"
_configured = False


def _configure() -> None:
    global _configured
    if _configured:
        return
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(os.environ.get("FASTGEN_VERBOSITY", "WARNING").upper())
    root.propagate = False
    _configured = True


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name`` under the ``fastgen`` root (other packages pass their ``__name__``)."""
    _configure()
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def set_verbosity(level: int | str) -> None:
    """Set the level of every fastgen logger (``"INFO"``, ``logging.DEBUG``, ...)."""
    _configure()
    logging.getLogger(_ROOT).setLevel(level.upper() if isinstance(level, str) else level)


class quiet_diffusers:
    """Context manager: diffusers' and transformers' loggers at ERROR inside (restored after).

    fastgen's benchmark and evaluation call pipelines many times with deliberate settings (e.g. the zoo's
    ``max_sequence_length=2`` for its all-zero T5 stub, which makes diffusers warn about "truncated" input
    on every call); the warnings would bury the results.
    """

    def __enter__(self):
        import diffusers.utils.logging as dlog

        self._dlog = dlog
        self._level = dlog.get_verbosity()
        dlog.set_verbosity_error()
        # the zoo tokenizer's "sequence length is longer than the specified maximum" on long prompts
        self._tlog = logging.getLogger("transformers")
        self._tlevel = self._tlog.level
        self._tlog.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        self._dlog.set_verbosity(self._level)
        self._tlog.setLevel(self._tlevel)
        return False


#: Third-party loggers that speak up when an optional backend is merely imported (``diffusers.hooks`` imports
#: every quantization backend transformers knows): torchao's "Failed to load <cuda kernel>.so" on CPU
#: machines, torch's pytree deprecation notices for torchao's enums, diffusers' "Unable to import torchao Tensor objects"
#: and transformers' "<X>ImageProcessor requires torchvision; falling back to <X>ImageProcessorPil" (no image processor is used).
_IMPORT_NOISE = ("torchao", "torch.utils._pytree", "diffusers.quantizers", "transformers.utils.import_utils")


def quiet_import_noise() -> None:
    """Raise the import-time-noisy third-party loggers (:data:`_IMPORT_NOISE`) to ERROR, for the CLIs."""
    for name in _IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def log_to_stderr_with_time() -> None:
    """For training CLIs: fastgen's loggers at INFO on stderr, each line stamped ``HH:MM:SS``."""
    _configure()
    quiet_import_noise()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger(_ROOT)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
