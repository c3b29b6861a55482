"""Data: raw_files.py fetches, checks and decodes the raw files (no Lightning: a search's driver uses it);
base_data_module.py and mnist.py make them Lightning DataModules. training.DATA_CLASSES looks them up by name."""
