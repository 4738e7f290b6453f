"""The training stage: `train(config) -> TrainResult` (see run.py)."""
