"""Bridges to other libraries' adapter formats and modules.

peft  Hugging Face PEFT's SHiRA adapters: read and write its checkpoints (AdapterBank.add_peft,
      AdapterBank.save_peft) and run its ShiRA layers on this package's kernels (accelerate).
      The peft package itself is imported only by the functions that need it.
"""
__all__ = ["peft"]
