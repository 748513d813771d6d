"""Reading and writing adapter checkpoints of other projects as shira_kernels formats."""
from .petl_vit import PetlVitCheckpoint, load_petl_vit, petl_vit_layout, save_petl_vit

__all__ = ["PetlVitCheckpoint", "load_petl_vit", "petl_vit_layout", "save_petl_vit"]
