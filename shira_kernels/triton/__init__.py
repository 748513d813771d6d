"""Triton kernels and their launchers, one file per op family. Imported only when the triton
backend runs, so the package imports without triton installed."""
