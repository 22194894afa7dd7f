"""The posterior mixture of language models over the same bytes: a fine-tuned model beside its
base (and earlier stages), each weighted by how well it has predicted the text so far.

With models m = 1..M and prior weights pi_m, the mixture predicts byte t + 1 as

    p(x_{t+1} | x_{<=t}) = sum_m w_{t,m} p_m(x_{t+1} | x_{<=t}),
    w_{t,m} = pi_m prod_{s=1..t} p_m(x_s | x_{<s}) / normaliser,

the Bayesian posterior that the text is model m's. Chained over a window of T bytes, it gives
the window the probability sum_m pi_m p_m(x), at least pi_m p_m(x) for every m, so its loss is
within log2(1 / pi_m) / T bits per byte of the best model's *on every window*: at even odds
between a base and its fine-tuned copy, 1 / T (0.0078 bpb at T = 128). No domain label is
needed, and the weights read only bytes already seen: causal. It costs one forward pass per
model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .evaluate import lm_logits


class PosteriorMixture(nn.Module):
    """forward(idx) -> (B, T, V) log-probabilities of the next byte under the mixture (usable
    as logits: softmax gives the mixture's probabilities back). ``log_prior``: each model's prior
    log-weight (normalised here; default even odds)."""

    def __init__(self, models: Sequence[nn.Module], log_prior: Sequence[float] | None = None) -> None:
        super().__init__()
        if len(models) < 1:
            raise ValueError("a mixture needs at least one model")
        if log_prior is not None and len(log_prior) != len(models):
            raise ValueError(f"{len(log_prior)} prior log-weights for {len(models)} models")
        if log_prior is not None and not all(math.isfinite(p) for p in log_prior):
            raise ValueError(f"prior log-weights must be finite, got {list(log_prior)}")
        self.models = nn.ModuleList(models)
        prior = torch.zeros(len(models)) if log_prior is None else torch.tensor(list(log_prior), dtype=torch.float)
        self.register_buffer("log_prior", prior.log_softmax(0), persistent=False)

    def forward(self, idx: Tensor) -> Tensor:
        log_w, logp = self._posterior(idx)
        return torch.logsumexp(log_w.unsqueeze(-1) + logp, 0)

    def weights(self, idx: Tensor) -> Tensor:
        """(M, B, T) each model's posterior weight at each position (for inspection)."""
        return self._posterior(idx)[0].exp()

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Sample from the mixture, re-reading the last ``seq_len`` bytes (the shortest context
        of the FractalMoE models in it) at every step: the weights need every byte so far, so no
        cache. idx: (B, T) -> (B, T + n)."""
        from .model import sample_next

        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError("need max_new_tokens >= 0, temperature >= 0 and top_k >= 1")
        context = min(m.cfg.seq_len for m in self.models)
        out = idx
        for _ in range(max_new_tokens):
            out = torch.cat([out, sample_next(self(out[:, -context:])[:, -1], temperature, top_k, generator)], 1)
        return out

    def flops_per_token(self) -> float:
        """Every model's (each reads every byte; FractalMoE models only): the mixing itself,
        a few operations per model and byte value, is left out as the models' softmaxes are."""
        return float(sum(m.flops_per_token() for m in self.models))

    def _posterior(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """log w (M, B, T) and each model's log-probabilities (M, B, T, V)."""
        logp = torch.stack([F.log_softmax(lm_logits(m, idx).float(), -1) for m in self.models])
        seen = logp[:, :, :-1].gather(-1, idx[None, :, 1:, None].expand(len(self.models), -1, -1, 1))[..., 0]
        evidence = F.pad(seen.cumsum(-1), (1, 0))  # position t: log p_m(x_1..x_t | x_0); 0 at t = 0
        return (self.log_prior.view(-1, 1, 1) + evidence).log_softmax(0), logp


def runs_mixture(runs: Sequence[str | Path], device: str = "cpu",
                 log_prior: Sequence[float] | None = None) -> PosteriorMixture:
    """The mixture of runs (a fine-tuning run's ``lineage``: base first), each loaded from its
    own latest checkpoint."""
    from .checkpoint import load_model_from_run

    return PosteriorMixture([load_model_from_run(r, device)[0] for r in runs], log_prior).to(device)


def lineage_mixture(run: str | Path, device: str = "cpu", log_prior: Sequence[float] | None = None) -> PosteriorMixture:
    """The mixture of a fine-tuning run with its base and every earlier stage."""
    from .finetune import lineage

    return runs_mixture(lineage(run), device, log_prior)
