"""Runs in the driver (and in tests and reports that read runs back): W&B runs per trial, the sweep, offline files."""
