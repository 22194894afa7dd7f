"""Fractal expert: f_1 = B_1, f_c(x) = J_c(f_{c-1}(f_{c-1}(x)), B_c(x)).

Legend: T tokens (flattened batch * time), D width, C fractal depth (columns).

B_c(x) = x + mix_c(norm(x)) is a pre-normalised residual routed block. Computing f_C costs
2**C - 1 block applications and yields every f_c(x), c < C, on the way: stage c turns f_{c-1}(x)
into f_c(x) for 2**(c-1) more. That staging is what adaptive depth compacts: a token that stops
at depth d never enters stage d + 1.

Tied (the original recursion) the C columns' blocks are reused at every application, so f(f(x))
acts like two weight-tied layers: the second application of a router sees nearly the same query
and reads mostly the same rows again. Untied, every application in the recursion (2**C - 1
blocks, 2**(C-1) - 1 joins) has its own router and join gate; all still read the one expert
bank, which holds nearly all the parameters. Untied reads fresh rows everywhere yet trained no
better than tied in the measurement in docs/results.md, so tied stays the default.

Route once (tied, ``route_once``): column c's router chooses its experts once per token, for the
layer input x (the application B_c(x) of stage c); its other 2**(C-c) - 1 applications, on
f_{c-1}-paths of x, read the same experts with gates from their own query. Scoring 2 sqrt(N)
sub-keys is then paid C times per layer instead of 2**C - 1: at a million experts that is most
of a block's FLOPs, and the second application reads nearly the same rows anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import DEEP_QUERIES, REPEAT_ROWS
from .conv import CausalConv
from .experts import ExpertBank
from .routing import Balancing, ProductKeyMemory
from .stats import JOIN_GATE, Recorder


def blocks_at_depth(depth: int) -> int:
    """Routed blocks evaluated to compute f_depth: 2**depth - 1."""
    return 2**depth - 1


def joins_at_depth(depth: int) -> int:
    """Join evaluations inside f_depth: 2**(depth - 1) - 1."""
    return 2 ** (depth - 1) - 1


def application_columns(depth: int, first: int) -> list[int]:
    """Column of each application in evaluation order, o_c = o_{c-1} + o_{c-1} + [c]: blocks
    with first = 1 (o_1 = [1]), joins with first = 2 (o_1 = [])."""
    order: list[int] = [1] if first == 1 else []
    for c in range(2, depth + 1):
        order = order + order + [c]
    return order


@dataclass(frozen=True)
class Sequences:
    """Tokens (T, D) as whole sequences (T // length, length, D) at positions pos.. (what block
    convolutions read); in cached generation, ``seen`` holds each block application's past inputs
    (``model.KVCache.block_in``), indexed in evaluation order."""

    length: int
    pos: int = 0
    seen: list[Tensor] | None = None


class RoutedBlock(nn.Module):
    """B(x) = x + mix(norm(x)) over the layer's shared expert bank, with its own router.

    With a convolution of width W > 0, mix reads conv(norm(x)): each position's query also sees
    its last W - 1 positions' inputs, so a block applied to another block's output mixes what was
    retrieved at nearby positions.
    """

    def __init__(self, dim: int, memory: ProductKeyMemory, conv: int = 0) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.conv = CausalConv(dim, conv) if conv else None
        self.memory = memory

    def forward(self, x: Tensor, bank: nn.Module, experts: Tensor | None = None,
                seqs: Sequences | None = None, application: int = 0,
                origin: Tensor | None = None, row_offset: int = 0) -> tuple[Tensor, Tensor]:
        """B(x) and the experts it chose (given ``experts``: those, re-weighted). x: (T, D). Given
        ``origin`` (the layer input x is a path from), the query reads x - origin: what the path
        has retrieved so far, not the token it started from. ``row_offset``: the rows read are
        the experts' shifted by it (mod N)."""
        q = self.norm(x if origin is None else x - origin)
        if self.conv is not None:
            if seqs is None:
                raise ValueError("a block convolution needs whole sequences: x of shape (B, T, D)")
            seen = seqs.seen[application] if seqs.seen is not None else None
            q = self.conv(q.view(-1, seqs.length, q.shape[-1]), seen, seqs.pos).view(q.shape)
        y, idx = self.memory.routed(q, bank, experts, row_offset)
        return x + y, idx


class HighwayJoin(nn.Module, Recorder):
    """J(deep, shallow) = g * deep + (1 - g) * shallow with g = sigmoid(w . x + b) per token.

    b < 0 at init starts deep paths as small refinements of the shallow one. In training, local
    drop-path removes each branch with probability p (never both); a token keeping one branch
    gets that branch alone.
    Under a collector it records the sum and count of its gate values (the join level of mixing).
    """

    def __init__(self, dim: int, bias: float) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, 1)
        self.initial_bias = bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The same gate for every token: sigmoid(b)."""
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, self.initial_bias)

    def forward(self, x: Tensor, deep: Tensor, shallow: Tensor,
                keep: tuple[Tensor, Tensor] | None = None) -> Tensor:
        g = torch.sigmoid(self.gate(x))  # (T, 1)
        if self.collecting:
            gates = g.detach().float()  # a count of thousands is not exact in bfloat16
            self.record(JOIN_GATE, torch.stack([gates.sum(), gates.new_full((), g.shape[0])]))
        joined = shallow + g * (deep - shallow)
        if keep is None:
            return joined
        # One branch kept: that branch alone, not g * deep / g, which is 0 / 0 once g saturates.
        keep_deep, keep_shallow = keep
        return torch.where(keep_deep & keep_shallow, joined, torch.where(keep_deep, deep, shallow))


class FractalExpert(nn.Module):
    """C routed blocks over one shared expert bank, joined in the fractal recursion.

    ``heads`` is one count of retrieval heads for every column, or one per column: column c's
    block runs 2**(C - c) times per token, so heads moved from column 1 to column C move reads from
    the deep path to the shallow one."""

    def __init__(self, dim: int, num_experts: int, depth: int = 2, heads: int | tuple[int, ...] = 8,
                 topk: int = 16,
                 key_dim: int = 128, gate: str = "softmax", query_norm: str = "layernorm",
                 act: str = "gelu", join_bias: float = -2.0, drop_path_local: float = 0.0,
                 drop_path_global: float = 0.0, expert_dtype: torch.dtype = torch.float32,
                 balancing: Balancing = Balancing(), kind: str = "neuron",
                 bank: ExpertBank | None = None, tied: bool = True, route_once: bool = False,
                 block_conv: int = 0, key_parts: int = 2, value_dropout: float = 0.0,
                 deep_query: str = "input", repeat_rows: str = "same") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        if route_once and not tied:
            raise ValueError("route_once needs tied blocks (one router per column)")
        column_heads = (heads,) * depth if isinstance(heads, int) else tuple(heads)
        if len(column_heads) != depth:
            raise ValueError(f"heads={heads}: one head count per column (depth={depth})")
        self.depth, self.drop_local, self.drop_global = depth, drop_path_local, drop_path_global
        self.tied, self.route_once = tied, route_once
        if deep_query not in DEEP_QUERIES:
            raise ValueError(f"deep_query={deep_query!r}: one of {DEEP_QUERIES}")
        self.retrieved_queries = deep_query == "retrieved"
        if repeat_rows not in REPEAT_ROWS or (repeat_rows == "shifted" and not tied):
            raise ValueError(f"repeat_rows={repeat_rows!r}: one of {REPEAT_ROWS}; shifted needs tied blocks")
        # Module of the p-th block / join application: its column's (tied) or its own (untied).
        block_cols, join_cols = application_columns(depth, 1), application_columns(depth, 2)
        self._block_at = [c - 1 for c in block_cols] if tied else list(range(len(block_cols)))
        self._join_at = [c - 2 for c in join_cols] if tied else list(range(len(join_cols)))
        if bank is None:
            self.bank = ExpertBank(num_experts, dim, act, expert_dtype, kind)
        else:  # shared with other layers and owned (stored once) by the model: not a submodule
            object.__setattr__(self, "bank", bank)
        # Column of each block module: 1..C tied, each application's own column untied.
        module_cols = list(range(1, depth + 1)) if tied else block_cols
        self.blocks = nn.ModuleList(
            RoutedBlock(dim, ProductKeyMemory(dim, num_experts, column_heads[c - 1], topk, key_dim,
                                              gate, query_norm, act, kind, own_bank=False,
                                              balancing=balancing, key_parts=key_parts,
                                              value_dropout=value_dropout), block_conv)
            for c in module_cols)
        self.joins = nn.ModuleList(HighwayJoin(dim, join_bias) for _ in range(len(set(self._join_at))))
        # Per application, added to the rows it reads: shifted, the k-th of its block's n
        # applications reads k N / n further on.
        shifted = repeat_rows == "shifted"
        self._row_offset = [self._block_at[:a].count(b) * (num_experts // self._block_at.count(b)) if shifted else 0
                            for a, b in enumerate(self._block_at)]

    def _keep_masks(self, c: int, x: Tensor, column: Tensor | None) -> tuple[Tensor, Tensor] | None:
        """Drop-path masks (bool, (T, 1)) for join c: local (random branch drop) and global (one
        column). Never both branches dropped."""
        if not self.training or (self.drop_local == 0.0 and column is None):
            return None
        shape = (x.shape[0], 1)
        keep_deep = torch.rand(shape, device=x.device) >= self.drop_local
        keep_shallow = torch.rand(shape, device=x.device) >= self.drop_local
        neither = ~(keep_deep | keep_shallow)
        coin = torch.rand(shape, device=x.device) < 0.5
        keep_deep = torch.where(neither, coin, keep_deep)
        keep_shallow = torch.where(neither, ~coin, keep_shallow)
        if column is not None:  # column k: shallow branch at join k, deep branch above it
            col = column.unsqueeze(-1)
            alone, above = col == c, (col > 0) & (col < c)
            keep_deep = (keep_deep | above) & ~alone
            keep_shallow = (keep_shallow | alone) & ~above
        return keep_deep, keep_shallow

    def block_of(self, application: int) -> RoutedBlock:
        """The block that the application-th block application (in evaluation order) runs."""
        return self.blocks[self._block_at[application]]

    def _application(self, application: int, x: Tensor, routes: list[Tensor] | None,
                     seqs: Sequences | None, origin: Tensor | None) -> Tensor:
        """The application-th block application on x: with ``routes``, its column's experts."""
        experts = routes[self._block_at[application]] if routes is not None else None
        return self.block_of(application)(x, self.bank, experts, seqs, application, origin,
                                          self._row_offset[application])[0]

    def _f(self, c: int, x: Tensor, column: Tensor | None, block: int, join: int,
           routes: list[Tensor] | None, seqs: Sequences | None, origin: Tensor | None) -> Tensor:
        """f_c(x) by direct recursion (2**c - 1 blocks) from the block-th block application and
        the join-th join application on; ``origin``: the layer input, when x is a path from it
        and queries read what was retrieved."""
        if c == 1:
            return self._application(block, x, routes, seqs, origin)
        prev = self._f(c - 1, x, column, block, join, routes, seqs, origin)
        shallow = self._application(block + 2 * blocks_at_depth(c - 1), x, routes, seqs, origin)
        return self._extend(c, x, prev, shallow, column, block + blocks_at_depth(c - 1),
                            join + joins_at_depth(c - 1), routes, seqs, origin)

    def _extend(self, c: int, x: Tensor, prev: Tensor, shallow: Tensor, column: Tensor | None,
                block: int, join: int, routes: list[Tensor] | None, seqs: Sequences | None,
                origin: Tensor | None = None) -> Tensor:
        """J_c(f_{c-1}(prev), shallow = B_c(x)), applications numbered from block and join on.
        prev is a path from the layer input (``origin``, or x itself when None)."""
        if self.retrieved_queries:
            origin = x if origin is None else origin
        deep = self._f(c - 1, prev, column, block, join, routes, seqs, origin)
        gate = self.joins[self._join_at[join + joins_at_depth(c - 1)]]
        return gate(x, deep, shallow, self._keep_masks(c, x, column))

    def stage(self, c: int, x: Tensor, prev: Tensor | None, column: Tensor | None = None,
              routes: list[Tensor] | None = None, seqs: Sequences | None = None) -> Tensor:
        """f_c(x) from prev = f_{c-1}(x): J_c(f_{c-1}(prev), B_c(x)). x, prev: (T, D); ``seqs``:
        their sequences, when they are whole ones (block convolutions need them).

        With ``route_once``, ``routes`` holds the experts columns 1..c-1 chose for x (for these
        tokens) and gains column c's, chosen here by B_c(x)."""
        if self.route_once and routes is None:
            raise ValueError("route_once: stage needs the routes list of the earlier stages")
        a = blocks_at_depth(c) - 1  # B_c(x): column c's first application
        shallow, experts = self.block_of(a)(x, self.bank, None, seqs, a, row_offset=self._row_offset[a])
        if routes is not None:
            routes.append(experts)
        if c == 1:
            return shallow
        assert prev is not None
        return self._extend(c, x, prev, shallow, column, blocks_at_depth(c - 1), joins_at_depth(c - 1),
                            routes, seqs)

    def join_gates_at_depth(self, depth: int) -> int:
        return len(set(self._join_at[:joins_at_depth(depth)]))

    def sample_columns(self, num_tokens: int, device: torch.device) -> Tensor | None:
        """Global drop-path: per token, with prob p, a single column 1..C to train alone."""
        if not self.training or self.drop_global == 0.0 or self.depth == 1:
            return None
        pick = torch.randint(1, self.depth + 1, (num_tokens,), device=device)
        use = torch.rand(num_tokens, device=device) < self.drop_global
        return torch.where(use, pick, torch.zeros_like(pick))

    def forward(self, x: Tensor, return_all_depths: bool = False, max_depth: int | None = None,
                seen: list[Tensor] | None = None, pos: int = 0) -> Tensor | list[Tensor]:
        """f_C(x), or [f_1(x), ..., f_C(x)] from the same single pass. x: (..., D), (B, T, D) at
        positions pos.. for block convolutions (``seen``: their cached inputs, in generation)."""
        lead, dim = x.shape[:-1], x.shape[-1]
        seqs = Sequences(x.shape[-2], pos, seen) if x.dim() >= 3 else None
        x_TD = x.reshape(-1, dim)
        column = self.sample_columns(x_TD.shape[0], x.device)
        outs: list[Tensor] = []
        prev: Tensor | None = None
        routes: list[Tensor] | None = [] if self.route_once else None
        for c in range(1, (max_depth or self.depth) + 1):
            prev = self.stage(c, x_TD, prev, column, routes, seqs)
            outs.append(prev.view(*lead, dim))
        return outs if return_all_depths else outs[-1]
