"""`python -m nanoft memory`: what a run needs, from shapes alone (estimate.py, peak.py, sharded.py, shape.py),
and measured (command.py)."""
