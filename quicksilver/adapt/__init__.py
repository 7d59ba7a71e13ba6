"""Training the small pieces a frozen model lacks for adaptive computation to keep its text:
low-rank adapters trained under SkipDecode's schedule (``adapt_skipdecode``) and per-layer
exit heads for halting's lens (``fit_exit_heads``). Each run writes one adapter file that
``quicksilver.load(..., adapter=PATH)`` applies: LoRA merged into the weights before any
quantisation, exit heads read by the logit-lens signals."""

from quicksilver.adapt.distill import adapt_skipdecode
from quicksilver.adapt.files import Adapter, default_adapter_dir, read_adapter
from quicksilver.adapt.lens import fit_exit_heads
from quicksilver.adapt.train import TrainingSettings
from quicksilver.adapt.workspace import AdapterResult

__all__ = [
    "Adapter",
    "AdapterResult",
    "TrainingSettings",
    "adapt_skipdecode",
    "default_adapter_dir",
    "fit_exit_heads",
    "read_adapter",
]
