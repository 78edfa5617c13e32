"""Data preparation: turns person-retrieval annotations (or a procedural generator) into webdataset shards.

See docs/DATA.md for the shard format, which is the contract between this package, src/training and
src/evaluation.
"""
from common.shards import FORMAT_VERSION  # noqa: F401  (the one definition: common/shards.py)
