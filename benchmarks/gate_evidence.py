"""What limits the domain gates' trade on a trained adapter set: how each reads its evidence.

    python benchmarks/gate_evidence.py --base runs/gpt2_base --data PATH [--lr 5e-3] [--expert-lr 0.05]
        [--seed 1] [--shape '{"adapter": "fhme", "heads": 1, "topk": 16, ...}'] > gate_evidence.jsonl

Trains one adapter set as ``finetune_gpt2.py finetune`` does (150 steps, same loop and seed),
then reads both domains' validation bpb (first 256 KB) with every trained update behind gates
read in other ways than ``DomainGate``'s, each at several priors:

* ``scale``: the gate at sigmoid(prior + alpha * sum_{s<=t} e_s), alpha 0.5 ... 4 (1 is the
  gate as it is: is its posterior too timid or too sure?);
* ``rows``: hashing routing of 4,096 or 65,536 rows instead of a million, and samples of 1,024
  windows a domain instead of ``SAMPLE_WINDOWS`` (is it the reading's grain, or too few counts?);
* ``probe``: a logistic probe of each site's RMS-normed input, fitted on the same samples, read
  alone at each position or summed over the positions so far at 0.25 or 1 (a learned reader
  instead of counts).

Each line holds the bpb on (new, base), and, per 16-byte slice of the window, the base's rise and
the new domain's loss against the ungated model: where in a window the gate errs. A pilot: the
readers are patched in here, not offered by the library.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
import finetune_gpt2  # noqa: E402

from fractalmoe import sparse_rows  # noqa: E402
from fractalmoe.config import TrainConfig  # noqa: E402
from fractalmoe.evaluate import lm_logits  # noqa: E402
from fractalmoe.finetune import finetune_in_memory  # noqa: E402
from fractalmoe.sparse_rows import DomainGate, gate_adapters, set_gate_prior  # noqa: E402

SEQ_LEN, BATCH = 128, 16
SHAPE = '{"adapter": "fhme", "heads": 1, "topk": 16, "attention_experts": 64, "attention_lora": 32}'
ALPHA = [1.0]


def scaled_forward(self: DomainGate, x: Tensor) -> Tensor:
    """``DomainGate.forward`` with its summed evidence scaled by ALPHA[0]."""
    return torch.sigmoid(self.prior + ALPHA[0] * self.evidence(x).cumsum(-1)).unsqueeze(-1).to(x.dtype)


class ProbeGate(nn.Module):
    """sigmoid(prior + l_t) (``mode`` "last") or sigmoid(prior + mode * sum_{s<=t} l_s), l the
    probe's logit of a position's RMS-normed input."""

    def __init__(self, w: Tensor, b: Tensor, mode: str | float) -> None:
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("b", b)
        self.mode, self.prior = mode, 0.0

    def forward(self, x: Tensor) -> Tensor:
        logit = F.rms_norm(x.float(), (x.shape[-1],)) @ self.w + self.b
        z = logit if self.mode == "last" else self.mode * logit.cumsum(-1)
        return torch.sigmoid(self.prior + z).unsqueeze(-1).to(x.dtype)


@torch.no_grad()
def token_bits(model: nn.Module, data) -> Tensor:
    """(windows, SEQ_LEN) bits of every validation position."""
    model.eval()
    out = []
    for x, y in data.val_batches(BATCH, SEQ_LEN):
        logits = lm_logits(model, x)
        out.append(F.cross_entropy(logits.flatten(0, 1).float(), y.reshape(-1), reduction="none").view(y.shape))
    return torch.cat(out) / math.log(2)


def site_inputs(model: nn.Module, sites: list[nn.Module], data, seed: int) -> list[Tensor]:
    """Each site's inputs over the domain's sample windows, flattened to (tokens, D)."""
    acc: list[list[Tensor]] = [[] for _ in sites]

    def keep(i: int):
        def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
            acc[i].append((args[0] if args else kwargs["hidden_states"]).detach().float())
        return hook

    sparse_rows.sample_passes(model, [(s, keep(i)) for i, s in enumerate(sites)], [data], SEQ_LEN, BATCH, seed)
    return [torch.cat(a).flatten(0, 1) for a in acc]


def fit_probe(new: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """Logistic regression, new = 1, by L-BFGS (L2 1e-4)."""
    x = F.rms_norm(torch.cat([new, kept]), (new.shape[-1],))
    y = torch.cat([torch.ones(len(new)), torch.zeros(len(kept))])
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-4 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--expert-lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--shape", default=SHAPE)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model, domains, _ = finetune_gpt2.load_base(argparse.Namespace(base=args.base, data=args.data,
                                                                   eval_bytes=262144, device="cpu"))
    shape = json.loads(args.shape)
    cfg = TrainConfig(max_steps=150, lr=args.lr, expert_lr=args.expert_lr, seed=args.seed, warmup_steps=15)
    finetune_in_memory(model, shape.pop("adapter"), shape.pop("lora_rank", 64), domains, cfg, SEQ_LEN, "cpu", **shape)
    new, kept = domains[0].data, [d.data for d in domains[1:]]
    ungated = [token_bits(model, d.data) for d in domains]
    sites = [s for s, _ in sparse_rows.gate_sites(model)]
    gate_adapters(model, new, kept, SEQ_LEN, BATCH, args.seed)
    set_gate_prior(model, -1e4)
    base = [token_bits(model, d.data) for d in domains]
    print(json.dumps({"ungated": [u.mean().item() for u in ungated], "base": [b.mean().item() for b in base]}),
          flush=True)

    def read(reader: dict, priors: tuple[int, ...]) -> None:
        for prior in priors:
            set_gate_prior(model, prior)
            for m in model.modules():
                if isinstance(m, ProbeGate):
                    m.prior = prior
            bits = [token_bits(model, d.data) for d in domains]
            slices = SEQ_LEN // 16
            print(json.dumps({**reader, "prior": prior, "bpb": [b.mean().item() for b in bits],
                              "rise_by_slice": (bits[1] - base[1]).mean(0).view(slices, 16).mean(1).tolist(),
                              "lost_by_slice": (bits[0] - ungated[0]).mean(0).view(slices, 16).mean(1).tolist()}),
                  flush=True)

    forward = DomainGate.forward
    DomainGate.forward = torch.no_grad()(scaled_forward)
    for alpha in (0.5, 1.0, 2.0, 4.0):
        ALPHA[0] = alpha
        read({"reader": "scale", "alpha": alpha}, (0, 4, 8, 12, 16))
    DomainGate.forward = forward
    for rows, windows in ((65536, 256), (4096, 256), (65536, 1024), (1048576, 1024)):
        for s in sites:
            s.domain_gate = None  # every reader fitted on the ungated model's inputs
        sparse_rows.GATE_ROUTING = {**sparse_rows.GATE_ROUTING, "num_experts": rows}
        sparse_rows.SAMPLE_WINDOWS = windows
        gate_adapters(model, new, kept, SEQ_LEN, BATCH, args.seed)
        sparse_rows.SAMPLE_WINDOWS = 256
        read({"reader": "rows", "rows": rows, "windows": windows}, (0, 4, 8, 12))
    for s in sites:
        s.domain_gate = None
    probes = [fit_probe(n, k) for n, k in zip(site_inputs(model, sites, new, args.seed),
                                              site_inputs(model, sites, kept[0], args.seed))]
    for mode in ("last", 0.25, 1.0):
        for s, (w, b) in zip(sites, probes):
            s.domain_gate = ProbeGate(w, b, mode)
        read({"reader": "probe", "mode": mode}, (0, 4, 8, 12))


if __name__ == "__main__":
    main()
