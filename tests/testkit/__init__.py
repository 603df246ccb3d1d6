"""Shared test models and worlds. Importable as `testkit` (pytest adds tests/ to sys.path).

Not `tests.*`: torch-fidelity 0.4.0 installs a top-level `tests` package that would shadow ours.
"""
