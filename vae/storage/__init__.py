"""What a run keeps on disk and how it is written: files.py (files in a run directory opened without following
symbolic links), checkpoint.py (atomic saves, model files read with weights_only, full training states, pruning)."""
