"""The training objective and its terms, in nats per image: the tutorial's -ELBO (a Bernoulli decoder and a
diagonal Gaussian posterior against the N(0, I) prior), and what the literature varies (the `loss` section):
a KL weight (beta-VAE), its linear warm-up, free bits, and the importance-weighted bound (IWAE).

Every per-image quantity is a function of that image alone, never of the batch: summed over a batch, the loss of
N processes' shares adds up to the loss of the whole batch, which is what lets 1 or N processes train the same
model (vae.training.step scales each share's sum by N for DDP's average).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import LossConfig

LOG_2PI = math.log(2 * math.pi)


def reconstruction_nats(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) under independent Bernoullis, summed over pixels: [...]. In float32 even under autocast."""
    return F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none").sum(-1)


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z_j|x) || N(0, 1)) of each latent dimension in closed form, Kingma & Welling (2013), Appendix B:
    -1/2 (1 + log sigma_j^2 - mu_j^2 - sigma_j^2). [B, z], float32."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), summed over the latent dimensions: [B]."""
    return -0.5 * torch.sum(1.0 + logvar.float() - mu.float().pow(2) - logvar.float().exp(), dim=-1)


def negative_elbo_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                        logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (reconstruction, KL) in nats; their sum is the single-sample estimate of -ELBO."""
    return reconstruction_nats(logits, x), kl_to_standard_normal(mu, logvar)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp()).sum(-1)


class Objective:
    """The loss section on the device: per-image training losses from the model's outputs, and train/beta.

    The KL weight lives in a device tensor that `at_step` refills before each step (only under a warm-up), so a
    captured CUDA graph reads the current weight and nothing is read back to the host."""

    def __init__(self, cfg: LossConfig, device: torch.device):
        self.cfg = cfg
        self.kl_weight = torch.tensor(self.weight_at(0), device=device)

    @property
    def samples(self) -> int:
        """Posterior samples per image the step draws noise for (loss.iwae_k)."""
        return self.cfg.iwae_k

    def weight_at(self, step: int) -> float:
        """The KL weight of the update after `step` updates: beta, reached linearly over loss.kl_warmup_steps (the
        first update weighs beta / kl_warmup_steps, update kl_warmup_steps and later beta)."""
        if self.cfg.kl_warmup_steps == 0:
            return self.cfg.beta
        return self.cfg.beta * min(1.0, (step + 1) / self.cfg.kl_warmup_steps)

    def at_step(self, step: int) -> None:
        if self.cfg.kl_warmup_steps:
            self.kl_weight.fill_(self.weight_at(step))

    def logged(self, step: int) -> dict:
        """train/beta, where the objective weighs the KL term at all (the weight of the step just taken)."""
        return {"train/beta": self.weight_at(step - 1)} if self.cfg.shapes_kl else {}

    def losses(self, x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
               noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(training loss, reconstruction, KL) per image [B], in nats. The last two are -ELBO's terms, what
        train/* reports whatever the loss; with the defaults the loss is their sum, as in the tutorial."""
        if self.cfg.iwae_k > 1:
            return self._iwae(x, logits, mu, logvar, noise)
        recon, kl = negative_elbo_terms(logits, x, mu, logvar)
        if not self.cfg.shapes_kl:
            return recon + kl, recon, kl
        shaped = kl
        if self.cfg.free_bits:
            shaped = kl_per_dimension(mu, logvar).clamp(min=self.cfg.free_bits).sum(-1)
        return recon + self.kl_weight * shaped, recon, kl

    def _iwae(self, x, logits, mu, logvar, noise) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x) over the k samples z_i = mu + sigma * noise_i (Burda et al.
        2015). logits [B, k, D], noise [B, k, z]."""
        mu, logvar, noise = mu.float(), logvar.float(), noise.float()
        recon_k = reconstruction_nats(logits, x[:, None, :].expand(logits.shape))  # [B, k]
        z = mu[:, None] + noise * torch.exp(0.5 * logvar[:, None])  # the samples the model decoded
        log_p_z = -0.5 * (LOG_2PI + z.pow(2)).sum(-1)
        # log q(z|x) from the noise itself: (z - mu) / sigma is the noise, exactly
        log_q_z = -0.5 * (LOG_2PI + logvar[:, None] + noise.pow(2)).sum(-1)
        log_w = -recon_k + log_p_z - log_q_z
        loss = -(torch.logsumexp(log_w, dim=1) - math.log(log_w.shape[1]))
        return loss, recon_k.mean(1), kl_to_standard_normal(mu, logvar)
