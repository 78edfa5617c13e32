"""What every package of the project uses, and nothing else: the shard format and its readers (shards.py), fsspec
helpers (fsio.py), the collectives the losses and the trainer call (collectives.py), the person-crop preprocessing
shared by training, evaluation and export (transforms.py), the named random streams (seeding.py), and the run
folder's contract: its file names, checkpoint saving and loading, weights resolution (runs.py).

It imports none of the project's other packages: data_prep, fast_clip, training and evaluation all sit above it.
"""
