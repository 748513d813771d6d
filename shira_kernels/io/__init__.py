"""Adapter checkpoints: this package's own safetensors format, and other projects' formats
(PEFT's SHiRA checkpoints, PETL-ViT's 1-bit adapters)."""
from .peft_format import peft_adapter_deltas, read_peft_adapter, write_peft_adapter
from .petl_vit import PetlVitCheckpoint, load_petl_vit, petl_vit_layout, save_petl_vit
from .shira_format import load_adapter, save_adapter

__all__ = ["PetlVitCheckpoint", "load_adapter", "load_petl_vit", "peft_adapter_deltas",
           "petl_vit_layout", "read_peft_adapter", "save_adapter", "save_petl_vit",
           "write_peft_adapter"]
