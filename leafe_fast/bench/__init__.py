"""``leafe-fast bench``: runs the benchmark scripts of a source checkout (``benchmarks/``).

The scripts themselves are not part of the installed package; :mod:`leafe_fast.bench.command` finds
and runs them.
"""
