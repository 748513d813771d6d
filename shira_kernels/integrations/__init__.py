"""Bridges to other libraries' adapter formats and modules.

peft  Hugging Face PEFT's SHiRA layers run on this package's kernels (accelerate). Its
      checkpoint format is io/peft_format.py (AdapterBank.add_peft, AdapterBank.save_peft).
      The peft package itself is imported only by the functions that need it.
"""
__all__ = ["peft"]
