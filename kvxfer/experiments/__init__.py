"""``kvxfer experiment NAME``: one module per paper comparison.

Each module exposes ``main(argv) -> int`` and accepts ``--quick`` (under 60 s on two
cores), ``--json`` (one JSON object per line on stdout, with the fields its issue names)
and ``--plot FILE``. Progress goes to stderr so stdout stays machine-readable.
"""
