"""The pipeline, in layers (each imports only those below it; tests/test_layering.py holds the order):
jobspec < data < evaluation < training < jobs < cli."""
