"""Run under torchrun with 2 processes: rank 1's loader fails at its third batch (a shard gone), rank 0's never does.
Each rank walks ``agreed_batches`` with an all-reduce per batch standing in for the training step's, and writes which
batch it stopped at and with what error to OUT.rankR.json."""
import json
import sys

import torch

from training import distributed as du
from training.data import DataError, agreed_batches

out = sys.argv[1]
env = du.init_distributed("cpu")


def loader():
    for i in range(6):
        if env.rank == 1 and i == 2:
            raise DataError("--train-data shard /x/train-000003.tar no longer exists")
        yield {"i": i}


seen, error = [], None
try:
    for batch in agreed_batches(loader(), env.device):
        du.all_reduce_sum(torch.ones(1))  # the step's gradient all-reduce
        seen.append(batch["i"])
except DataError as e:
    error = str(e)
json.dump({"seen": seen, "error": error}, open(f"{out}.rank{env.rank}.json", "w"))
du.destroy_distributed()
