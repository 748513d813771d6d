"""The measuring and demonstrating side of the package, kept out of its core.

  bench_suite.py   the measurements of `shira-kernels bench` (json, md, plots; matplotlib and
                   peft from the `[bench]` extra, each optional)
  benchmark.py     shapes, cases, timers, the machine description and the alternatives timed
                   against (shared with bench/)
  demo.py          `shira-kernels demo`
  cpu_variant.py   the CPU kernels of some csrc/cpu built for some -march (bench/ab_cpu_kernels.py,
                   tests/test_cpu_avx2_build.py)

Nothing in the library imports this package: the `shira-kernels` command (cli.py) imports its
modules inside the commands that need them. The import-linter contracts in pyproject.toml
enforce both.
"""
