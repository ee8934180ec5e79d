"""Multi-LoRA serving: PEFT adapters applied per token through a hook on the linear layers.

Importing this package loads no torch (the scheduler and the front end use ``LoRARequest`` and
``read_peft_config``); the compute lives in ``sluice.lora.layers`` and ``sluice.lora.manager``.
"""
from sluice.lora.request import LoRARequest

__all__ = ["LoRARequest"]
