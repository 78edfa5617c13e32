"""The person-retrieval protocol, below both the trainer (periodic validation) and the evaluation command line:
test sets read from shards (testset.py), the pure retrieval metrics (metrics.py), and a model scored on test sets
(protocol.py)."""
