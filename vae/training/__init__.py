"""The training: loop.py (set-up, then per epoch train, test pass, report, checkpoint; figures and summary) and
what it is made of: step.py (eager or CUDA-graph steps), optim.py (Adam), ema.py (the weights' average),
run_state.py (where a run stands), resume.py (what a resume may change), progress.py (train/* between epochs),
profiling.py (train.profile_steps), perf.py (start-up phases, data waits, peak memory)."""
