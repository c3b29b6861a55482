"""Runs in Ray's workers, and in the forks of --trial-process fork: the trainables Tune calls, the fork server,
the training of one trial, the checkpoint a resumed trial starts from. Nothing here imports the driver's side of the
search (tests/test_structure.py checks it)."""
