"""Training under ``torch.autocast`` (bfloat16, as GPU training loops run it), here on the CPU,
whose autocast dispatches the same way: the layer's own autograd functions against plain-autograd
references under the same autocast, and whole training steps against float32 ones."""

from __future__ import annotations

import pytest
import torch

from fractalmoe.config import TrainConfig, tiny_model_config
from fractalmoe.experts import expert_mix, expert_mix_reference, value_mix
from fractalmoe.model import FHMELanguageModel
from fractalmoe.optim import ModelOptimizer
from fractalmoe.product_keys import sub_key_topk
from fractalmoe.train import train_step

BF16 = dict(rtol=2e-2, atol=2e-2)


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("n,k", [(16, 4), (64, 4)])  # dense score gradient, and the sparse one
def test_sub_key_top_k_under_autocast_equals_autograd_of_its_definition(n: int, k: int) -> None:
    """Scored in bfloat16 as autocast scores an einsum, selected exactly among those scores, and
    the gradients reach the float32 query and keys in their own dtype."""
    torch.manual_seed(0)
    q = torch.randn(10, 3, 8, requires_grad=True)
    keys = torch.randn(3, n, 8, requires_grad=True)
    w = torch.randn(10, 3, k)
    with _bf16():
        vals, idx = sub_key_topk(q, keys, k)
    (vals.float() * w).sum().backward()
    q_ref, keys_ref = q.detach().clone().requires_grad_(), keys.detach().clone().requires_grad_()
    with _bf16():
        scores = torch.einsum("thq,hnq->thn", q_ref, keys_ref)
    ref_idx = scores.float().topk(k, dim=-1).indices
    ref_vals = scores.gather(-1, ref_idx)
    (ref_vals.float() * w).sum().backward()
    assert vals.dtype == torch.bfloat16
    assert torch.equal(vals, ref_vals)
    assert torch.equal(vals.float().gather(-1, idx.argsort(-1)), ref_vals.float().gather(-1, ref_idx.argsort(-1)))
    assert q.grad.dtype == keys.grad.dtype == torch.float32
    torch.testing.assert_close(q.grad, q_ref.grad, **BF16)
    torch.testing.assert_close(keys.grad, keys_ref.grad, **BF16)


@pytest.mark.parametrize("layout", ["sparse", "dense", "deferred"])
@pytest.mark.parametrize("autocast", [False, True])
def test_mixes_take_a_bfloat16_input_with_float32_gates_and_tables(layout: str, autocast: bool) -> None:
    """A block's input is bfloat16 under autocast (a convolution's output) while its gates
    (a softmax) and tables stay float32: outputs and input gradients come back in the inputs'
    dtypes, table gradients as the float32 reference's."""
    torch.manual_seed(0)
    t, m, n, d = 12, 4, 32, 8
    x = torch.randn(t, d).bfloat16().requires_grad_()
    idx, gates = torch.randint(0, n, (t, m)), torch.rand(t, m, requires_grad=True)
    down, up = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_neurons = expert_mix(x, idx, gates, down, up, layout=layout)
        y_values = value_mix(idx, gates, up, layout=layout)
    assert y_neurons.dtype == torch.bfloat16 and y_values.dtype == torch.float32
    y = y_neurons.float() + y_values
    dy = torch.randn(t, d)
    (y * dy).sum().backward()
    grads = [x.grad, gates.grad]
    if layout == "deferred":  # formed by the row optimizer's step: compared there (test_optim)
        assert down.grad is None and up.grad is None
    else:
        grads += [down.grad.to_dense(), up.grad.to_dense()]
    xr, gr = x.detach().float().requires_grad_(), gates.detach().clone().requires_grad_()
    dr, ur = down.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    ref = expert_mix_reference(xr, idx, gr, dr, ur) + torch.einsum("tm,tmd->td", gr, ur[idx])
    (ref * dy).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and gates.grad.dtype == torch.float32
    torch.testing.assert_close(y, ref, **BF16)
    for got, want in zip(grads, [xr.grad, gr.grad, dr.grad, ur.grad]):
        torch.testing.assert_close(got.float(), want, **BF16)


VARIANTS = {
    "fhme": {}, "pkm": dict(ffn="pkm"), "peer": dict(ffn="peer"), "memplus": dict(ffn="memplus"),
    "moe": dict(ffn="moe"), "dense": dict(ffn="dense"), "neuron": dict(block="neuron"),
    "gated": dict(block="gated"), "bf16-tables": dict(expert_dtype="bfloat16"),
    "adaptive": dict(adaptive_depth=True, fractal_depth=3, block_conv=0),
    "three-part-keys": dict(key_parts=3, key_dim=12, num_experts=512, route_once=True),
    "balanced": dict(ffn="pkm", balance_loss=0.01, balance_rate=0.1), "whitened": dict(query_norm="whiten"),
}


def _dense_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient (float32, dense); tables whose gradients the optimizer forms
    (deferred) have none."""
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).float()
            for n, p in model.named_parameters() if p.grad is not None}


def _grad_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {n: p.grad.dtype for n, p in model.named_parameters() if p.grad is not None}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("deferred", [False, True])
def test_training_steps_under_autocast_track_float32_ones(name: str, deferred: bool) -> None:
    """The same model, data and optimizer: three bfloat16-autocast steps end within bfloat16's
    reach of the float32 steps, and every gradient and parameter keeps its dtype.

    bfloat16 scores move some top-k choices, and AdamW's first steps are about lr * sign(g), so
    gradients and updates are compared by direction and size per parameter, not element by
    element: the first step's gradients (both runs start from the same weights) point the same
    way at the same size, and so do the three steps' updates, over the whole model and (more
    loosely, Adam amplifying the sign of small entries) per parameter. A join's gate bias (one
    number, a sum of cancelling per-token terms) is left to the whole-model comparisons."""
    cfg = tiny_model_config(**({"ffn": "fhme", "ffn_conv": 4, "block_conv": 3} | VARIANTS[name]))
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    losses, dtypes, grads, updates = {}, {}, {}, {}
    for autocast in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = FHMELanguageModel(cfg).train()
        opt = ModelOptimizer(model, 3e-3, 0.03, 0.0, "lazy_adam", deferred_table_grads=deferred)
        dtypes[autocast] = {n: p.dtype for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        steps = []
        for i in range(3):
            steps.append(train_step(model, opt, x, x.roll(-1, 1), 1.0, autocast=autocast))
            got = _grad_dtypes(model)  # the step's gradients, left in place until the next one
            assert got and got == {n: dtypes[autocast][n] for n in got}
            if i == 0:
                grads[autocast] = _dense_grads(model)
        assert all(ok for _, ok in steps)
        losses[autocast] = [loss for loss, _ in steps]
        assert {n: p.dtype for n, p in model.named_parameters()} == dtypes[autocast]
        updates[autocast] = {n: (p.detach() - before[n]).float() for n, p in model.named_parameters()}
    assert losses[torch.bfloat16][-1] < losses[torch.bfloat16][0]
    torch.testing.assert_close(losses[torch.bfloat16], losses[None], rtol=1e-2, atol=0.0)
    for kind, (ref, got) in {"gradient": (grads[None], grads[torch.bfloat16]),
                             "update": (updates[None], updates[torch.bfloat16])}.items():
        assert ref.keys() == got.keys()
        assert _cosine(torch.cat([v.flatten() for v in got.values()]),
                       torch.cat([v.flatten() for v in ref.values()])) > (0.8 if kind == "gradient" else 0.6)
        for n, want in ref.items():
            assert bool(want.abs().max() > 0), (kind, n)  # every parameter learns
            if want.numel() == 1:  # a join's gate bias: left to the whole-model cosine
                continue
            assert _cosine(got[n], want) > (0.5 if kind == "gradient" else 0.0), (kind, n)
            lo, hi = (0.5, 2.0) if kind == "gradient" else (1 / 3, 3.0)
            assert lo < float(got[n].norm() / want.norm()) < hi, (kind, n)


def test_autocast_is_a_train_setting_checked_by_name() -> None:
    assert TrainConfig(autocast="bfloat16").autocast == "bfloat16"
    with pytest.raises(ValueError, match="autocast"):
        TrainConfig(autocast="float16")
