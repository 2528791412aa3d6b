"""Puts the repository root on sys.path for the tests: `configs/` is a folder of config files that
`ml_collections` loads by path (and that the tests import), not part of the installed package."""
import os

# With libtpu installed (the [tpu] extra, for tests/test_aot.py) and no TPU attached, JAX would
# probe for a TPU at start and print libtpu warnings; the suite runs on the CPU. Ahead-of-time
# compiles for TPU topologies work with the CPU as the platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
