"""Fault injection for tests/test_faults.py, loaded by Python at start-up when this folder is on PYTHONPATH.
Faults no config can produce on demand, on one chosen process:

VAE_TEST_NONFINITE_STEPS="1:5,1:6" makes the training loss of process rank 1 not finite (nan) at its training
steps 5 and 6 (steps counted from 1 within this start; a rank given as * means every rank): what
train.skip_nonfinite does with a transient nan.

VAE_TEST_SAVE_FAILS_ON_RANK=1 makes process rank 1's part of every full checkpoint fail as a full disk would
(OSError ENOSPC) while the other processes write theirs: how the processes agree on a failed save.

VAE_TEST_SIGNAL_AT_STEP="0:40:SIGTERM" makes process rank 0 send itself SIGTERM right after global step 40 (before
the loop looks for a stop): a stop that lands on an exact step, such as an epoch's last.
"""

import os

_failing_rank = os.environ.get("VAE_TEST_SAVE_FAILS_ON_RANK")
if _failing_rank is not None and os.environ.get("RANK", "0") == _failing_rank:
    import errno

    import accelerate

    _save_state = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, *args, **kwargs):
        """Fails after the real save began, as a disk filling up would."""
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(str(output_dir), "random_states_1.pkl"))

    accelerate.Accelerator.save_state = save_state

_spec = os.environ.get("VAE_TEST_NONFINITE_STEPS")
if _spec:
    import torch

    import vae.models.objectives

    _rank = os.environ.get("RANK", "0")
    _steps = {int(step) for rank, step in (item.split(":") for item in _spec.split(",")) if rank in ("*", _rank)}
    _original = vae.models.objectives.negative_elbo_terms
    _calls = 0

    def negative_elbo_terms(logits, x, mu, logvar):
        """The real terms, with nan in the first image's reconstruction at the chosen training steps."""
        global _calls
        recon, kl = _original(logits, x, mu, logvar)
        if torch.is_grad_enabled():  # training steps only, not the test-set pass
            _calls += 1
            if _calls in _steps:
                first = torch.arange(len(recon), device=recon.device) == 0
                recon = torch.where(first, torch.full_like(recon, float("nan")), recon)
        return recon, kl

    vae.models.objectives.negative_elbo_terms = negative_elbo_terms

_signal_spec = os.environ.get("VAE_TEST_SIGNAL_AT_STEP")
if _signal_spec:
    import signal

    import vae.cluster.preemption

    _signal_rank, _signal_step, _signal_name = _signal_spec.split(":")
    _agreed = vae.cluster.preemption.StopRequest.agreed

    def agreed(self, accelerator, step, *args, **kwargs):
        """The real check, after the signal was sent once at the chosen step."""
        if step == int(_signal_step) and os.environ.get("RANK", "0") == _signal_rank and not self.requested:
            os.kill(os.getpid(), getattr(signal, _signal_name))
        return _agreed(self, accelerator, step, *args, **kwargs)

    vae.cluster.preemption.StopRequest.agreed = agreed
