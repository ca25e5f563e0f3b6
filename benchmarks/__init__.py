"""Benchmarks for resd: the transport limit, resd, reslock, contention and scale.

Run ``python -m benchmarks`` from the repository root (``--help`` for options). Not part
of the test suite; ``tests/test_bench_smoke.py`` runs ``--smoke`` so the harness cannot rot.
Results and their analysis live in ``docs/performance.md``.
"""
