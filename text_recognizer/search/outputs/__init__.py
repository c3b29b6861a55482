"""Runs in the driver: what a search leaves and shows: the trials' rows, summary.json and trials.csv, the report,
the progress lines, and which checkpoints an ended trial keeps."""
