"""``resctl``, the command-line tool of resd (typer + rich), built on ``resd_client``.

Modules: ``main`` (the command table, ``status``, ``version``), ``pools``,
``tenants``, ``reservations``, ``export``, ``watch`` (the commands), ``options``
(flag types and parsers), ``render`` (tables, bars, units), ``session`` (output,
connection and error-to-exit-code mapping).
"""
