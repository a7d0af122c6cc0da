"""fewstep."""
import logging as _logging


class _DropOptionalKernelNote(_logging.Filter):
    """bitsandbytes (imported by peft when installed) warns at import that an optional 4-bit CPU matmul kernel
    package is missing; fewstep uses only its 8-bit optimizer (``train.optimizer=adamw8bit``), which needs none."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropOptionalKernelNote())
