"""The Ray Tune search: config validation, the trial function, W&B logging and results."""
