"""Adapter checkpoints: this package's own safetensors format, and other projects' formats."""
from .petl_vit import PetlVitCheckpoint, load_petl_vit, petl_vit_layout, save_petl_vit
from .shira_format import load_adapter, save_adapter

__all__ = ["PetlVitCheckpoint", "load_adapter", "load_petl_vit", "petl_vit_layout", "save_adapter",
           "save_petl_vit"]
