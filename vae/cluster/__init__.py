"""Running on machines and clusters: launch.py (the Accelerator and the launch checks train.py and evaluate.py
share), run_dir.py (one run directory per training: its lock, room on its disk, the files a run records),
preemption.py (signals -> checkpoint, Slurm requeue), launcher.py (`accelerate launch` for the Slurm scripts,
keeping a planned stop's exit code, from exit_records.py), rank_logs.py (each process's output in its own log)."""
