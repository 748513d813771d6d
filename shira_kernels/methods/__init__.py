"""Recipes for the adapter methods the package serves, built on its layers and kernels.

Each module is one method (MoSA, composed sparse fine-tunes, the ranking-aware CLIP adapter);
its example lives in examples/ and its guide in docs/methods/. Nothing in the library's lower
layers imports this package.
"""
