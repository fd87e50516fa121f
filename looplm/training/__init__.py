"""Training: objectives, optimiser and schedule, checkpoints' training state, the training loop.

``looplm.train(run, out_dir)`` (a plain function in ``looplm/__init__.py``) runs
``looplm.training.trainer.Trainer``."""
