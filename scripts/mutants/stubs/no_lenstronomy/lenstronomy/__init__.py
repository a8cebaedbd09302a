"""A stand-in for a missing lenstronomy (scripts/check_mutants.py, mutant missing_reference)."""

raise ImportError("No module named 'lenstronomy' (stub of scripts/mutants/stubs)")
