"""cim-aq library: crossbar-faithful quantization, cost model, search and training helpers."""
import logging


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch.utils.cpp_extension's import-time notice that a CUDA toolkit was found without a
    CUDA runtime: Brevitas imports that module (we build no extensions), so every CPU-only start
    printed it. Its other messages, e.g. of an extension a user builds, pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


# installed before anything imports torch (no torch import here: `--help` stays light)
logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())
