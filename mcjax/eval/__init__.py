"""`mcjax eval`: the evaluation suites of a trained run and its POC acceptance report (see `cli.py`)."""
