"""jobs: the ``ptsne`` command line, and the only package that talks to MLflow.

One module per subcommand (``quickstart``, ``data``, ``affinities``, ``train``,
``embed``, ``models``), each with ``add_parser`` and ``run``; ``cli`` builds the
command line and holds what every subcommand shares (exit codes, error reports,
Ray options). MLflow: ``tracking`` (where runs live), ``flavor`` (how a mapper is
logged and loaded as a pyfunc model), ``registry`` (register, look up, describe).
``docs/architecture.md`` maps every module.
"""
