"""URAE on FLUX.1: the library (generation, adapters, tiled decoding, training, synthetic data)."""

from __future__ import annotations

import logging
import sys


class _CpuOnlyKernelNoise(logging.Filter):
    """torchao ships CUDA kernels and says so at import when it cannot load them; on a host without
    CUDA that is expected and not the user's concern. Where CUDA is there the messages still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(("Failed to load ", "Unable to import `torchao`", "Warning: Detected no triton")):
            return True
        torch = sys.modules.get("torch")
        return bool(torch is not None and torch.cuda.is_available())


_noise = _CpuOnlyKernelNoise()
# A logger's filters see only its own records, not its children's: each logger that says it, by name.
for _name in ("torchao", "torchao.kernel.intmm"):
    logging.getLogger(_name).addFilter(_noise)
logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(_noise)
# A deprecation torchao triggers in torch when it registers its enums; nothing a user can act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


class _UnusedImageProcessorNoise(logging.Filter):
    """diffusers' pipeline modules import transformers' image processors (for IP-adapters, which we never
    load); without torchvision, transformers falls back to the PIL ones and says so, in every process."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_UnusedImageProcessorNoise())
