"""Pipeline steps and their building blocks: plain Python over files, no Hydra and no kfp.

Steps (each also `python -m components.<step>`): data_prep, train, evaluate.
Building blocks, one concept each: config (the schema), datasets, models, training (the
loop), early_stopping, metrics, tracking (W&B), storage (every file write), errors.
"""
