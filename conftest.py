"""Puts the repository root on sys.path for the tests: `configs/` is a folder of config files that
`ml_collections` loads by path (and that the tests import), not part of the installed package."""
import os

# With libtpu installed (the [tpu] extra, for tests/test_aot.py) and no TPU attached, JAX would
# probe for a TPU at start and print libtpu warnings; the suite runs on the CPU. Ahead-of-time
# compiles for TPU topologies work with the CPU as the platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's CPU programs are compiled with LLVM at -O1 instead of XLA's default -O3: the tiny
# train step compiles about a quarter faster and runs as fast (`python -m vosr_jax.bench
# --config=configs/multistep.py:tiny --what=train`), and most of the suite's time is compilation.
# -O0 compiles faster still but runs the step 5x slower. Subprocesses that set XLA_FLAGS append
# theirs to this (`tests/train_utils.xla_flags`); a flag given in XLA_FLAGS overrides it.
os.environ["XLA_FLAGS"] = " ".join(
    ["--xla_backend_optimization_level=1", os.environ.get("XLA_FLAGS", "")]).strip()
