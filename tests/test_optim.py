"""Row-sparse optimisers equal dense implementations of the same rule on touched rows and
leave every other row, and its state, untouched."""

from __future__ import annotations

import math

import torch

from fractalmoe.optim import LazyAdam, RowwiseAdagrad

N, D = 50, 6


def _sparse_grad(rows: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor(rows)
    values = torch.randn(len(rows), D, generator=g, dtype=torch.float64)
    return torch.sparse_coo_tensor(idx.unsqueeze(0), values, (N, D))  # duplicates allowed


def _steps():
    return [[1, 4, 4, 9], [4, 7, 30], [0, 1, 49, 49, 49], [9]]


def dense_rowwise_adagrad(w, acc, grad, touched, lr, eps):
    """The rule on a dense (N, D) gradient, applied where `touched`."""
    acc = torch.where(touched, acc + grad.pow(2).mean(1), acc)
    step = lr * grad / (acc.sqrt() + eps).unsqueeze(1)
    return torch.where(touched.unsqueeze(1), w - step, w), acc


def dense_lazy_adam(w, m, v, grad, touched, t, lr, b1, b2, eps):
    t_mask = touched.unsqueeze(1)
    m = torch.where(t_mask, b1 * m + (1 - b1) * grad, m)
    v = torch.where(t_mask, b2 * v + (1 - b2) * grad * grad, v)
    step = lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
    return torch.where(t_mask, w - step, w), m, v


def test_rowwise_adagrad_equals_dense_rule() -> None:
    w0 = torch.randn(N, D, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = RowwiseAdagrad([p], lr=0.1, eps=1e-8)
    w, acc = w0.clone(), torch.zeros(N, dtype=torch.float64)
    for i, rows in enumerate(_steps()):
        grad = _sparse_grad(rows, i)
        p.grad = grad.clone()  # the optimiser consumes its gradient
        opt.step()
        touched = torch.zeros(N, dtype=torch.bool)
        touched[rows] = True
        w, acc = dense_rowwise_adagrad(w, acc, grad.to_dense(), touched, 0.1, 1e-8)
        torch.testing.assert_close(p.data, w)
        torch.testing.assert_close(opt.state[p]["sum"].double(), acc, rtol=1e-6, atol=1e-7)
    never = [r for r in range(N) if r not in {x for s in _steps() for x in s}]
    assert torch.equal(p.data[never], w0[never]) and (opt.state[p]["sum"][never] == 0).all()


def test_lazy_adam_equals_dense_rule_and_torch_sparse_adam() -> None:
    w0 = torch.randn(N, D, dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    ref_p = torch.nn.Parameter(w0.clone())
    opt = LazyAdam([p], lr=0.01)
    torch_opt = torch.optim.SparseAdam([ref_p], lr=0.01)
    w, m, v = w0.clone(), torch.zeros(N, D, dtype=torch.float64), torch.zeros(N, D, dtype=torch.float64)
    for i, rows in enumerate(_steps(), start=1):
        grad = _sparse_grad(rows, i)
        p.grad, ref_p.grad = grad, grad.clone()
        opt.step()
        torch_opt.step()
        touched = torch.zeros(N, dtype=torch.bool)
        touched[rows] = True
        w, m, v = dense_lazy_adam(w, m, v, grad.coalesce().to_dense(), touched, i, 0.01, 0.9, 0.999, 1e-8)
        torch.testing.assert_close(p.data, w)
        torch.testing.assert_close(p.data, ref_p.data)
    never = [r for r in range(N) if r not in {x for s in _steps() for x in s}]
    assert torch.equal(p.data[never], w0[never])
    assert (opt.state[p]["exp_avg"][never] == 0).all()
