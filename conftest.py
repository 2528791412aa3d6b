"""Puts the repository root on sys.path for the tests: `configs/` is a folder of config files that
`ml_collections` loads by path (and that the tests import), not part of the installed package."""
