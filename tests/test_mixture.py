"""PosteriorMixture against the joint it must equal: sum_m pi_m p_m(window)."""

import math

import pytest
import torch
from torch import nn

from fractalmoe.mixture import PosteriorMixture


class Context(nn.Module):
    """A small causal byte model: logits at t from a running mean of embeddings up to t."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head = nn.Embedding(256, 8), nn.Linear(8, 256)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx).cumsum(1) / torch.arange(1, idx.shape[1] + 1).view(1, -1, 1)
        return 3 * self.head(h)


def window_logprob(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """(B,) log p(x_1..x_{T-1} | x_0) by the chain rule, from the model's own outputs."""
    logp = torch.log_softmax(model(idx).float(), -1)[:, :-1]
    return logp.gather(-1, idx[:, 1:, None])[..., 0].sum(1)


@pytest.mark.parametrize("log_prior", [None, [0.0, -2.0, 1.0]])
def test_chained_mixture_equals_the_prior_weighted_joint(log_prior):
    models = [Context(s) for s in (1, 2, 3)]
    idx = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    mix = PosteriorMixture(models, log_prior)
    pi = torch.tensor(log_prior or [0.0] * 3).log_softmax(0)
    joint = torch.logsumexp(torch.stack([p + window_logprob(m, idx) for p, m in zip(pi, models)]), 0)
    torch.testing.assert_close(window_logprob(mix, idx), joint, rtol=1e-5, atol=1e-4)


def test_within_log_one_over_prior_of_the_best_model_on_every_window():
    models = [Context(1), Context(2)]
    idx = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    mixed = window_logprob(PosteriorMixture(models), idx)
    best = torch.stack([window_logprob(m, idx) for m in models]).max(0).values
    assert (mixed >= best - math.log(2) - 1e-4).all() and (mixed <= best + 1e-4).all()


def test_one_model_is_that_model():
    model = Context(4)
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(PosteriorMixture([model])(idx), torch.log_softmax(model(idx), -1))


def test_weights_are_causal_and_start_at_the_prior():
    models = [Context(1), Context(2)]
    mix = PosteriorMixture(models, [0.0, math.log(3)])
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 256
    torch.testing.assert_close(mix(idx)[:, :12], mix(changed)[:, :12])
    w = mix.weights(idx)
    torch.testing.assert_close(w[:, :, 0], torch.tensor([[0.25, 0.25], [0.75, 0.75]]))
    torch.testing.assert_close(w.sum(0), torch.ones(2, 20))


@pytest.mark.parametrize("prior, msg", [([0.0], "1 prior log-weights for 2"), ([0.0, float("inf")], "finite")])
def test_bad_priors_are_refused(prior, msg):
    with pytest.raises(ValueError, match=msg):
        PosteriorMixture([Context(1), Context(2)], prior)


def test_flops_are_every_models():
    from fractalmoe import FHMELanguageModel
    from fractalmoe.config import tiny_model_config

    models = [FHMELanguageModel(tiny_model_config(dim=32)) for _ in range(2)]
    assert PosteriorMixture(models).flops_per_token() == 2 * models[0].flops_per_token()


def test_greedy_generation_of_one_model_is_that_models():
    from fractalmoe import FHMELanguageModel
    from fractalmoe.config import tiny_model_config

    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config(dim=32)).eval()
    prompt = torch.randint(0, 256, (2, 5))
    want = model.generate(prompt, 12, temperature=0)
    torch.testing.assert_close(PosteriorMixture([model]).generate(prompt, 12, temperature=0), want)
