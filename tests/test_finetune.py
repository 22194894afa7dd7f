"""fractalmoe finetune: before/after reports on every domain, sequential adaptation, sparse rows,
the output gate, LoRA on every dense projection and FHME adapters sized to match it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fractalmoe import FHMELanguageModel
from fractalmoe.adapters import (
    AdaptedAttention,
    AdaptedFFN,
    add_fhme_adapters,
    add_lora_adapters,
    base_router_queries,
    build_adapted_model,
    experts_for_budget,
    fhme_adapter_parameter_count,
    lora_parameter_count,
    lora_rank_cap,
    lora_targets,
    mask_rows,
    trainable_parameter_count,
)
from fractalmoe.checkpoint import latest_checkpoint, load_model_from_run
from fractalmoe.cli import main
from fractalmoe.config import RunConfig, TrainConfig, tiny_model_config
from fractalmoe.evaluate import val_bpb
from fractalmoe.finetune import load_domain
from fractalmoe.optim import ModelOptimizer
from fractalmoe.sparse_rows import StepRowSelector, rank_rows, sparse_row_masks
from fractalmoe.train import run

peft = pytest.importorskip("peft")

SHAKESPEARE = "All the world's a stage, and all the men and women merely players.\n" * 60
CODE = "def f(x):\n    return x * 2\n\nclass A:\n    pass\n" * 80
PROSE = "In the beginning God created the heaven and the earth. And the earth was without form.\n" * 60
FT = ["--max-steps", "3", "--quiet", "--set", "batch_size=4"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    paths = {}
    for name, text in (("base", SHAKESPEARE), ("code", CODE), ("prose", PROSE)):
        paths[name] = root / f"{name}.txt"
        paths[name].write_text(text)
    cfg = RunConfig(tiny_model_config(dim=64), TrainConfig(batch_size=4, max_steps=4, eval_every=4,
                                                           sample_bytes=0))
    torch.manual_seed(0)
    run(cfg, out=root / "base_run", data_path=str(paths["base"]), progress=False, log=lambda s: None)
    paths["run"] = root / "base_run"
    paths["root"] = root
    return paths


def _finetune(capsys, *args: str) -> dict:
    assert main(["finetune", *args, *FT, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_report_and_metrics_carry_both_domains_before_and_after(corpora, capsys) -> None:
    out = corpora["root"] / "report"
    assert main(["finetune", "--base", str(corpora["run"]), "--data", str(corpora["code"]),
                 "--out", str(out), "--experts", "64", *FT]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "val_bpb" in last and "base_val_bpb" in last and last.count("->") == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    before, after = lines[0], lines[-1]
    assert (before["phase"], before["step"], after["phase"], after["step"]) == ("before", 0, "after", 3)
    for line in (before, after):
        assert line["val_bpb"] > 0 and line["base_val_bpb"] > 0
    # "before" is the base model on the whole validation splits (adapters start as the identity)
    base, config, _ = load_model_from_run(corpora["run"])
    seq, batch = config.model.seq_len, config.train.batch_size
    for key, name in (("base_val_bpb", "base"), ("val_bpb", "code")):
        whole = load_domain(str(corpora[name]), 0.1, seq)
        assert before[key] == pytest.approx(val_bpb(base, whole, seq, batch))
    assert after["val_bpb"] < before["val_bpb"]  # it learnt the new domain
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--experts", "64",
                  "--out", str(corpora["root"] / "report_json"), "--eval-bytes", "100")
    for key in ("val_bpb_before", "val_bpb", "base_val_bpb_before", "base_val_bpb"):
        assert isinstance(s[key], float)
    small = load_domain(str(corpora["code"]), 0.1, seq, 100)
    assert len(small.val) == 100 and s["val_bpb_before"] == pytest.approx(val_bpb(base, small, seq, batch))


def _adapted_ffns(model) -> list[AdaptedFFN]:
    return [b.ffn for b in model.blocks]


def test_sequential_fhme_keeps_first_adapters_frozen_and_active(corpora, capsys) -> None:
    a_dir, b_dir = corpora["root"] / "seq_a", corpora["root"] / "seq_b"
    a = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--experts", "64",
                  "--out", str(a_dir))
    b = _finetune(capsys, "--base", str(a_dir), "--data", str(corpora["prose"]), "--experts", "64",
                  "--out", str(b_dir))
    assert b["prior_data"] == [str(corpora["code"])] and b["base_data"] == str(corpora["base"])
    # A's adapters are active while B is measured: B's "before" on A's domain is A's "after"
    assert b["prior_val_bpb_before"][0] == pytest.approx(a["val_bpb"])
    assert b["base_val_bpb_before"] == pytest.approx(a["base_val_bpb"])
    model_a, _, _ = load_model_from_run(a_dir)
    model_b, _, _ = load_model_from_run(b_dir)
    for ffn_a, ffn_b in zip(_adapted_ffns(model_a), _adapted_ffns(model_b)):
        inner = ffn_b.base  # B's set wraps A's
        assert isinstance(inner, AdaptedFFN) and isinstance(inner.base, type(ffn_a.base))
        for (name, pa), pb in zip(ffn_a.adapter.named_parameters(), inner.adapter.parameters()):
            assert torch.equal(pa, pb), name  # A's adapters are untouched by B's training
        assert not torch.equal(ffn_b.adapter.fractal.bank.up, torch.zeros_like(ffn_b.adapter.fractal.bank.up))
    saved = (latest_checkpoint(b_dir) / "model.safetensors")
    from safetensors.torch import load_file

    assert all(".ffn.adapter." in k for k in load_file(str(saved)))  # B's run holds only B's set
    # with B's set silenced the model is exactly A's
    for ffn in _adapted_ffns(model_b):
        ffn.adapter.fractal.bank.up.data.zero_()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model_b(idx), model_a(idx), rtol=0, atol=0)


def test_sequential_lora_merges_the_first_and_full_continues(corpora, capsys) -> None:
    a_dir = corpora["root"] / "lora_a"
    a = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--adapter", "lora",
                  "--lora-rank", "8", "--out", str(a_dir))
    b = _finetune(capsys, "--base", str(a_dir), "--data", str(corpora["prose"]), "--adapter", "lora",
                  "--lora-rank", "8", "--out", str(corpora["root"] / "lora_b"))
    assert b["prior_val_bpb_before"][0] == pytest.approx(a["val_bpb"], abs=1e-4)  # merged, still active
    assert b["trainable_params"] == a["trainable_params"]  # only the new LoRA trains
    c = _finetune(capsys, "--base", str(a_dir), "--data", str(corpora["prose"]), "--adapter", "full",
                  "--out", str(corpora["root"] / "lora_full"))
    assert c["trainable_params"] > a["trainable_params"] and c["prior_val_bpb_before"][0] == pytest.approx(a["val_bpb"])


def test_sequential_attention_lora_merges_the_first_stage_under_the_second(corpora, capsys) -> None:
    """A second stage of FHME adapters with LoRA on attention over a first: the first stage's
    LoRA is merged into its weights and stays active, and only the new set trains."""
    a_dir = corpora["root"] / "attention_lora_a"
    args = ["--adapter", "fhme", "--match-lora-rank", "16", "--heads", "1", "--topk", "4", "--attention-lora", "4"]
    a = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), *args, "--out", str(a_dir))
    b = _finetune(capsys, "--base", str(a_dir), "--data", str(corpora["prose"]), *args,
                  "--out", str(corpora["root"] / "attention_lora_b"))
    assert b["prior_val_bpb_before"][0] == pytest.approx(a["val_bpb"], abs=1e-4)
    assert b["trainable_params"] == a["trainable_params"]
    first, _, _ = load_model_from_run(a_dir)
    spec = {"kind": "fhme", "fhme": {"num_experts": b["fhme_experts"], "heads": 1, "topk": 4}, "attention_lora": 4}
    stacked = build_adapted_model(str(a_dir), spec)  # the second stage before it learns
    assert trainable_parameter_count(stacked) == b["trainable_params"]
    assert sum("lora_A" in n for n, _ in stacked.named_parameters()) == 2 * len(first.blocks)  # the first merged
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(stacked(idx), first(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam", "dense_adamw"])
def test_row_mask_leaves_untrained_rows_bit_identical(rule: str) -> None:
    model = FHMELanguageModel(tiny_model_config(ffn="dense"))
    adapters = add_fhme_adapters(model, num_experts=64, heads=2, topk=4, key_dim=16)
    keeps = []
    for a in adapters:
        a.fractal.bank.up.data.normal_()  # nonzero everywhere, so a stray update would show
        keeps.append(torch.rand(64) < 0.25)
        mask_rows(a, keeps[-1])
    before = [{n: t.detach().clone() for n, t in a.fractal.bank.tables().items()} for a in adapters]
    opt = ModelOptimizer(model, lr=1e-2, expert_lr=0.1, weight_decay=0.1, expert_optim=rule)
    idx = torch.randint(0, 256, (4, 32))
    for _ in range(4):
        opt.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
    changed = 0
    for a, keep, old in zip(adapters, keeps, before):
        for name, table in a.fractal.bank.tables().items():
            assert torch.equal(table[~keep], old[name][~keep]), name
            changed += int((table[keep] != old[name][keep]).any(1).sum())
    assert changed > 0


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam"])
def test_a_mask_that_changes_every_step_moves_only_that_steps_rows(rule: str) -> None:
    """As with rows chosen at every step: a row that learned before and is read now but not
    chosen now keeps still, although lazy Adam holds momentum for it."""
    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config(ffn="dense"))
    (adapter,) = add_fhme_adapters(model, layers=[0], num_experts=64, heads=2, topk=4, key_dim=16)
    adapter.fractal.bank.up.data.normal_()
    keep = torch.zeros(64, dtype=torch.bool)
    mask_rows(adapter, keep)
    opt = ModelOptimizer(model, lr=1e-2, expert_lr=0.1, weight_decay=0.1, expert_optim=rule)
    idx = torch.randint(0, 256, (4, 32))
    for step in range(4):
        keep.copy_(torch.rand(64) < 0.5)
        before = {n: t.detach().clone() for n, t in adapter.fractal.bank.tables().items()}
        opt.zero_grad()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        for name, table in adapter.fractal.bank.tables().items():
            assert torch.equal(table[~keep], before[name][~keep]), (step, name)


def test_sparse_rows_refuse_a_bank_shared_by_layers() -> None:
    from fractalmoe.data import ByteDataset

    model = FHMELanguageModel(tiny_model_config(ffn="pkm", share_bank=True, num_experts=64, topk=4, key_dim=16))
    data = ByteDataset.from_bytes(b"To be, or not to be. " * 40, 0.1, 16)
    with pytest.raises(ValueError, match="share one expert bank"):
        sparse_row_masks(model, data, [data], top=8, seq_len=16, batch_size=4, seed=1)


def test_rank_rows_prefers_rows_the_base_domain_rarely_uses() -> None:
    new = torch.tensor([10, 10, 10, 0, 2, 50])
    kept_windows = torch.tensor([90, 0, 10, 0, 0, 100])  # of 100 kept windows
    mask = rank_rows(new, kept_windows, 100, 2)
    assert mask.tolist() == [False, True, True, False, False, False]
    assert rank_rows(new, kept_windows, 100, 4).tolist() == [True, True, True, False, True, False]
    # a row every kept window reads (the new domain's favourite here) comes last; never one it never chose
    assert rank_rows(new, kept_windows, 100, 10).tolist() == [True, True, True, False, True, True]
    # with a cap on the kept windows, rows more of them read are never picked
    capped = [rank_rows(new, kept_windows, 100, 10, max_kept_windows=m).tolist() for m in (0, 10)]
    assert capped == [[False, True, False, False, True, False], [False, True, True, False, True, False]]


def test_choice_counts_count_choices_and_windows() -> None:
    from fractalmoe.data import ByteDataset
    from fractalmoe.sparse_rows import SAMPLE_WINDOWS, choice_counts

    model = FHMELanguageModel(tiny_model_config(ffn="dense"))
    (adapter,) = add_fhme_adapters(model, layers=[0], num_experts=64, heads=2, topk=4, key_dim=16)
    data = ByteDataset.from_bytes(b"To be, or not to be. " * 40, 0.1, 16)
    ((counts, windows),) = choice_counts(model, [adapter], data, seq_len=16, batch_size=8, seed=1)
    blocks = len(adapter.fractal.blocks)  # applications per token at full depth: tied blocks repeat
    per_application = SAMPLE_WINDOWS * 16 * 2 * 4  # windows x tokens x heads x top-k
    assert int(counts.sum()) % per_application == 0 and int(counts.sum()) >= per_application * blocks
    assert int(windows.max()) <= SAMPLE_WINDOWS and bool((windows <= counts).all())
    assert bool(((counts > 0) == (windows > 0)).all())


def test_sparse_rows_cli_trains_only_the_chosen_rows(corpora, capsys) -> None:
    out = corpora["root"] / "rows"
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--experts", "64",
                  "--sparse-rows", "8", "--out", str(out))
    assert s["trained_rows"] and all(0 < n <= 8 for n in s["trained_rows"].values())
    from safetensors.torch import load_file

    masks = load_file(str(out / "row_mask.safetensors"))
    model, _, _ = load_model_from_run(out)
    for i, ffn in enumerate(_adapted_ffns(model)):
        up = ffn.adapter.fractal.bank.up
        keep = masks[str(i)].bool()
        assert torch.equal(up[~keep], torch.zeros_like(up[~keep]))  # up starts at zero: untouched rows stay 0
        assert up[keep].abs().sum() > 0


def test_memory_finetuning_changes_only_the_chosen_rows_of_the_base_tables(corpora, capsys) -> None:
    """--adapter memory: no new layer; of the base's own tables only the chosen rows move, and
    the run stores them with a reference to its base."""
    out = corpora["root"] / "memory"
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--adapter", "memory",
                  "--match-lora-rank", "2", "--out", str(out), "--set", "expert_lr=0.1")
    base, _, _ = load_model_from_run(corpora["run"])
    tuned, _, _ = load_model_from_run(out)
    assert not any(isinstance(ffn, AdaptedFFN) for ffn in _adapted_ffns(tuned))
    rows = s["fhme_experts"]
    row_width = sum(t.shape[1] for t in tuned.blocks[0].ffn.fractal.bank.tables().values())
    assert 0 < rows and s["fhme_params"] == rows * len(tuned.blocks) * row_width <= s["lora_params"]
    from safetensors.torch import load_file

    masks = load_file(str(out / "row_mask.safetensors"))
    chosen = sum(int(m.sum()) for m in masks.values())
    assert s["trainable_params"] == chosen * row_width and s["trained_rows"] == {
        k: int(m.sum()) for k, m in masks.items()}
    moved = 0
    for i, (b, t) in enumerate(zip(base.blocks, tuned.blocks)):
        keep = masks[str(i)].bool()
        assert 0 < int(keep.sum()) <= rows
        for name, table in t.ffn.fractal.bank.tables().items():
            old = b.ffn.fractal.bank.tables()[name]
            assert torch.equal(table[~keep], old[~keep])
            moved += int((table[keep] != old[keep]).any(-1).sum())
        others = [(n, p) for n, p in t.named_parameters() if "bank" not in n]
        assert all(torch.equal(p, dict(b.named_parameters())[n]) for n, p in others)
    assert moved > 0


def test_memory_with_embeddings_trains_them_within_the_budget(corpora, capsys) -> None:
    """--with-embeddings: the byte embeddings (and the head tied to them) learn and are stored with
    the run; rows give way so that rows x width + embeddings stays within LoRA's count."""
    out = corpora["root"] / "memory_embed"
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--adapter", "memory",
                  "--match-lora-rank", "32", "--rows-per-step", "--with-embeddings", "--out", str(out),
                  "--set", "expert_lr=0.1", "--set", "lr=0.01")
    base, _, _ = load_model_from_run(corpora["run"])
    tuned, _, _ = load_model_from_run(out)
    embed = tuned.embed.weight.numel()
    row_width = sum(t.shape[1] for t in tuned.blocks[0].ffn.fractal.bank.tables().values())
    assert s["with_embeddings"] and s["trainable_params"] == s["sparse_rows"] * len(tuned.blocks) * row_width + embed
    assert s["trainable_params"] <= s["lora_params"] < s["trainable_params"] + len(tuned.blocks) * row_width
    assert not torch.equal(tuned.embed.weight, base.embed.weight) and tuned.head.weight is tuned.embed.weight
    frozen = [n for n, _ in tuned.named_parameters() if "bank" not in n and "embed" not in n]
    assert all(torch.equal(dict(tuned.named_parameters())[n], dict(base.named_parameters())[n]) for n in frozen)


def test_rows_per_step_train_each_steps_top_rows_by_tf_idf_only() -> None:
    """Each step, exactly the rows ``rank_rows`` ranks first by that step's own choices (counted
    here independently) receive gradient; the kept domains' hub rows come last."""
    from fractalmoe import FHME

    layer = FHME(16, 256, depth=2, heads=2, topk=4, key_dim=8, block="value").train()
    for p in layer.parameters():
        p.requires_grad_(p is layer.fractal.bank.values)
    kept_windows = torch.zeros(256, dtype=torch.long)
    kept_windows[::2] = 10  # the kept domains read every even row in all of their 10 windows
    selector = StepRowSelector(layer, kept_windows, 10, top=6)
    counts = torch.zeros(256, dtype=torch.long)

    def count(router, inputs, output):
        counts.add_(torch.bincount(output[1].reshape(-1), minlength=256))
    for block in layer.fractal.blocks:
        block.memory.router.register_forward_hook(count)
    chosen = []
    for _ in range(2):
        counts.zero_()
        layer.fractal.bank.values.grad = None
        layer(torch.randn(24, 16)).square().sum().backward()
        want = rank_rows(counts, kept_windows, 10, 6)
        assert torch.equal(selector.keep, want) and int(want.sum()) == 6
        assert (want & (kept_windows == 0)).sum() == min(6, int(((counts > 0) & (kept_windows == 0)).sum()))
        grad = layer.fractal.bank.values.grad.coalesce()
        moved = grad.indices()[0][grad.values().abs().sum(-1) > 0]
        assert set(moved.tolist()) <= set(want.nonzero().flatten().tolist()) and len(moved) > 0
        chosen.append(want)
    assert not torch.equal(chosen[0], chosen[1])
    assert torch.equal(selector.trained, chosen[0] | chosen[1])
    with torch.no_grad():  # evaluation forwards count nothing
        layer.eval()(torch.randn(24, 16))
    assert not selector.pending and int(selector.counts.sum()) == 0


def test_rows_by_gain_keep_the_top_gradient_per_base_read_and_scale_them() -> None:
    """Each step's kept rows are the ``top`` by |g_r|^2 / (f_r + delta) of that step's own table
    gradient (made here by a second, unhooked copy of the layer), and each kept row's gradient
    arrives divided by f_r + delta; every other row gets none."""
    import copy

    from fractalmoe import FHME

    torch.manual_seed(0)
    layer = FHME(16, 256, depth=2, heads=2, topk=4, key_dim=8, block="value").train()
    reference = copy.deepcopy(layer)
    for m in (layer, reference):
        for p in m.parameters():
            p.requires_grad_(p is m.fractal.bank.values)
    share = torch.rand(256) * 3
    share[::3] = 0.0  # rows the kept domains never read
    selector = StepRowSelector(layer, torch.zeros(256, dtype=torch.long), 10, top=6, kept_share=share, delta=0.1)
    x = torch.randn(24, 16)
    layer(x).square().sum().backward()
    reference(x).square().sum().backward()
    g = reference.fractal.bank.values.grad
    g = g.to_dense() if g.is_sparse else g
    cost = share + 0.1
    want = torch.zeros(256, dtype=torch.bool)
    want[(g.square().sum(1) / cost).topk(6).indices] = True
    assert torch.equal(selector.keep, want) and torch.equal(selector.trained, want)
    got = layer.fractal.bank.values.grad
    got = got.to_dense() if got.is_sparse else got
    torch.testing.assert_close(got[want], g[want] / cost[want].unsqueeze(1))
    assert not got[~want].any()


def test_sparse_rows_keep_the_routing_the_rows_were_chosen_under() -> None:
    from fractalmoe.data import ByteDataset

    model = FHMELanguageModel(tiny_model_config(ffn="dense"))
    add_fhme_adapters(model, num_experts=64, heads=2, topk=4, key_dim=16)
    new = ByteDataset.from_bytes(b"def f(x):\n    return x\n" * 40, 0.1, 16)
    kept = ByteDataset.from_bytes(b"To be, or not to be. " * 40, 0.1, 16)
    sparse_row_masks(model, new, [kept], top=8, seq_len=16, batch_size=4, seed=1)
    for block in (b for ffn in model.blocks for b in ffn.ffn.adapter.fractal.blocks):
        assert not any(p.requires_grad for p in block.memory.router.parameters())
        assert not any(p.requires_grad for p in block.norm.parameters())
    assert all(t.requires_grad for ffn in model.blocks for t in ffn.ffn.adapter.fractal.bank.tables().values())


def test_output_gate_starts_identical_and_learns(corpora, capsys) -> None:
    model = FHMELanguageModel(tiny_model_config(ffn="dense"))
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(idx)
    add_fhme_adapters(model, output_gate=True, num_experts=64, heads=2, topk=4, key_dim=16)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref, rtol=0, atol=0)
    gates = [b.ffn.gate for b in model.blocks]
    assert all(g.weight.requires_grad and float(g.bias.detach()) == -4.0 for g in gates)
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--experts", "64",
                  "--output-gate", "--out", str(corpora["root"] / "gate"))
    assert s["output_gate"] and s["val_bpb"] < s["val_bpb_before"]


def test_matched_sizing_is_the_closest_fhme_count_at_or_below_lora(corpora, capsys) -> None:
    model = FHMELanguageModel(tiny_model_config(dim=64))
    budget = lora_parameter_count(lora_targets(model), 32)
    experts, count = experts_for_budget(model, budget)
    n = int(experts**0.5)
    assert n * n == experts and count <= budget
    assert 2 * fhme_adapter_parameter_count(64, num_experts=(n + 1) ** 2) > budget  # the next one is over
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]),
                  "--match-lora-rank", "32", "--out", str(corpora["root"] / "matched"))
    assert s["fhme_params"] <= s["lora_params"] and s["trainable_params"] == s["fhme_params"]
    assert s["lora_params"] == budget and s["fhme_experts"] == experts
    lora = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--adapter", "lora",
                     "--lora-rank", "32", "--out", str(corpora["root"] / "matched_lora"))
    assert lora["trainable_params"] == lora["lora_params"] == budget
    shaped = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--match-lora-rank",
                       "32", "--heads", "1", "--topk", "4", "--out", str(corpora["root"] / "matched_h1"))
    experts, count = experts_for_budget(model, budget, heads=1, topk=4)
    assert (shaped["fhme_experts"], shaped["fhme_params"]) == (experts, count) and count <= budget
    assert shaped["fhme_shape"] == {"depth": 2, "heads": 1, "topk": 4}
    loaded, _, _ = load_model_from_run(corpora["root"] / "matched_h1")  # the shape comes back from the spec
    router = _adapted_ffns(loaded)[0].adapter.fractal.blocks[0].memory.router
    assert (router.heads, router.topk) == (1, 4)


def test_reroute_trains_the_base_routers_queries_within_the_matched_count(corpora, capsys) -> None:
    """--reroute: beside the FHME adapters only the base's own routers' query projections change;
    they are counted in LoRA's budget, saved with the run and come back on load."""
    out = corpora["root"] / "rerouted"
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--match-lora-rank", "32",
                  "--heads", "1", "--topk", "4", "--reroute", "--out", str(out))
    base, _, _ = load_model_from_run(corpora["run"])
    queries = base_router_queries(base)
    rerouted = sum(w.numel() for w in queries)
    experts, count = experts_for_budget(base, s["lora_params"] - rerouted, heads=1, topk=4)
    assert s["reroute"] and s["fhme_experts"] == experts and s["fhme_params"] == count + rerouted
    assert s["trainable_params"] == s["fhme_params"] <= s["lora_params"]
    loaded, _, _ = load_model_from_run(out)
    trained = base_router_queries(loaded)
    assert all(not torch.equal(a, b) for a, b in zip(queries, trained))  # every query projection moved
    before = dict(base.named_parameters())
    after = {n.replace(".ffn.base.", ".ffn."): p for n, p in loaded.named_parameters() if ".adapter." not in n}
    moved = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in after.items() if p.requires_grad}
    assert moved and all(n.endswith("router.query.weight") for n in moved)


def test_attention_adapters_are_sized_in_the_matched_count_saved_and_loaded(corpora, capsys) -> None:
    """--attention-experts: an FHME of that many experts at each attention input (topk at most its
    key width), counted in LoRA's budget with the FFN adapters sized to what is left; it trains,
    is saved with the run and comes back on load, the base untouched."""
    out = corpora["root"] / "attention"
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--match-lora-rank", "32",
                  "--heads", "1", "--topk", "6", "--attention-experts", "16", "--out", str(out))
    base, _, _ = load_model_from_run(corpora["run"])
    layers, dim = len(base.blocks), base.cfg.dim
    at_attention = layers * fhme_adapter_parameter_count(dim, heads=1, topk=4, num_experts=16)
    experts, count = experts_for_budget(base, s["lora_params"] - at_attention, heads=1, topk=6)
    assert s["attention"] == {"num_experts": 16, "topk": 4}
    assert s["fhme_experts"] == experts and s["fhme_params"] == count + at_attention
    assert s["trainable_params"] == s["fhme_params"] <= s["lora_params"]
    loaded, _, _ = load_model_from_run(out)
    assert all(isinstance(b.attn, AdaptedAttention) and isinstance(b.ffn, AdaptedFFN) for b in loaded.blocks)
    assert all(b.attn.adapter.fractal.bank.tables()["up"].abs().sum() > 0 for b in loaded.blocks)  # it learned
    before = dict(base.named_parameters())
    after = {n.replace(".ffn.base.", ".ffn.").replace(".attn.base.", ".attn."): p
             for n, p in loaded.named_parameters() if ".adapter." not in n}
    assert after.keys() == before.keys() and all(torch.equal(p, before[n]) for n, p in after.items())
    assert loaded.flops_per_token() == pytest.approx(base.flops_per_token() + sum(
        a.flops_per_token() for b in loaded.blocks for a in (b.attn.adapter, b.ffn.adapter)))


def test_attention_lora_is_sized_in_the_matched_count_saved_and_loaded(corpora, capsys) -> None:
    """--attention-lora: LoRA of that rank on the attention projections beside the FHME adapters
    (here with --attention-experts too), counted in LoRA's budget with the FFN adapters sized to
    what is left; all of them learn, the run reloads with them and the base untouched."""
    out = corpora["root"] / "attention_lora"
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--match-lora-rank", "32",
                  "--heads", "1", "--topk", "6", "--attention-experts", "16", "--attention-lora", "8",
                  "--out", str(out))
    base, _, _ = load_model_from_run(corpora["run"])
    beside = (lora_parameter_count(lora_targets(base, which="attention"), 8)
              + len(base.blocks) * fhme_adapter_parameter_count(base.cfg.dim, heads=1, topk=4, num_experts=16))
    experts, count = experts_for_budget(base, s["lora_params"] - beside, heads=1, topk=6)
    assert s["attention_lora"] == 8 and s["attention"] == {"num_experts": 16, "topk": 4}
    assert s["fhme_experts"] == experts and s["fhme_params"] == count + beside
    assert s["trainable_params"] == s["fhme_params"] <= s["lora_params"]
    loaded, _, _ = load_model_from_run(out)
    adapters = [a for b in loaded.blocks for a in (b.ffn.adapter, b.attn.adapter)]
    assert all(isinstance(b.attn, AdaptedAttention) for b in loaded.blocks)
    assert all(a.fractal.bank.tables()["up"].abs().sum() > 0 for a in adapters)  # they learned
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 * len(loaded.blocks) and all(p.abs().sum() > 0 for p in lora_b)  # qkv and proj learned
    before = dict(base.named_parameters())
    after = {n.replace(".ffn.base.", ".ffn.").replace(".attn.base.", ".attn.").replace(".base_layer.", "."): p
             for n, p in loaded.named_parameters() if ".adapter." not in n and "lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(p, before[n]) for n, p in after.items())


def _leaf_linears(layer: torch.nn.Module) -> set[str]:
    return {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}


def test_lora_targets_every_dense_projection_of_a_dense_fractalmoe_model() -> None:
    model = FHMELanguageModel(tiny_model_config(ffn="dense"))
    names = {n for n, _ in lora_targets(model)}
    projections = ("attn.qkv", "attn.proj", "ffn.w1", "ffn.w2", "ffn.w3")
    assert names == {f"blocks.{i}.{p}" for i in range(2) for p in projections}
    assert names == {f"blocks.{i}.{n}" for i in range(2) for n in _leaf_linears(model.blocks[i])}
    assert {n for n, _ in lora_targets(model, which="ffn")} == {n for n in names if ".ffn." in n}
    expected = lora_parameter_count(lora_targets(model), 8)
    assert add_lora_adapters(model, rank=8, targets="all") == 8
    assert trainable_parameter_count(model) == expected
    assert all(hasattr(model.get_submodule(n), "lora_A") for n in names)
    with pytest.raises(ValueError, match="width / 2"):
        add_lora_adapters(FHMELanguageModel(tiny_model_config(ffn="dense")), rank=17, targets="all")


def test_lora_targets_skip_routing_logits_of_fhme_layers() -> None:
    model = FHMELanguageModel(tiny_model_config(adaptive_depth=True))
    names = {n.split(".", 2)[2] for n, _ in lora_targets(model)}
    assert names == {"attn.qkv", "attn.proj", "ffn.output_gate", "ffn.fractal.blocks.0.memory.router.query",
                     "ffn.fractal.blocks.1.memory.router.query"}  # not joins' gates, not the depth router
    assert {n.split(".", 2)[2] for n, _ in lora_targets(model, which="ffn")} == {n for n in names if n[:4] == "ffn."}


def test_lora_targets_every_dense_projection_of_gpt2() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    names = {n for n, _ in lora_targets(model)}
    assert names == {f"transformer.h.{i}.{p}" for i in range(2)
                     for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {n for n, _ in lora_targets(model, which="ffn")} == {n for n in names if ".mlp." in n}
    assert lora_rank_cap(model, lora_targets(model, which="ffn"), "ffn") == 16  # width / 2, as for all
    expected = lora_parameter_count(lora_targets(model), 16)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(idx).logits
    add_lora_adapters(model, rank=16, targets="all")
    assert trainable_parameter_count(model) == expected
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, ref, rtol=0, atol=0)


def test_gpt2_in_memory_finetune_reports_both_domains(corpora) -> None:
    transformers = pytest.importorskip("transformers")
    from fractalmoe.finetune import Domain, finetune_in_memory

    cfg = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=2)
    domains = [Domain(str(corpora["code"]), load_domain(str(corpora["code"]), 0.1, 32)),
               Domain(str(corpora["base"]), load_domain(str(corpora["base"]), 0.1, 32))]
    for method, fit_keys in (("fhme", False), ("rows", False), ("rows", True), ("lora", False), ("full", False)):
        model = transformers.GPT2LMHeadModel(cfg)
        row = finetune_in_memory(model, method, 32, domains, TrainConfig(batch_size=4, max_steps=2), 32,
                                 experts=4096, fit_keys=fit_keys)
        assert row["val_bpb"] < row["val_bpb_before"] and row["base_val_bpb_before"] > 0
        if method in ("fhme", "rows"):
            assert row["trainable_params"] == row["fhme_params"] <= row["lora_params"]
        if method == "rows":  # rows x width x layers + the joins: the most rows within LoRA's count
            assert row["lora_params"] - row["fhme_params"] < 64 * 2
            assert all(0 < n for n in row["trained_rows"].values()) and row["max_kept_windows"] == 0
            assert row["fit_keys"] is fit_keys
            keys = [m.sub_keys for name, m in model.named_modules() if name.endswith("router")]
            assert keys and all(torch.allclose(k.norm(dim=-1), torch.ones(())) is fit_keys for k in keys)
    with pytest.raises(ValueError, match="--reroute needs a base whose FFNs are FHME layers"):
        finetune_in_memory(transformers.GPT2LMHeadModel(cfg), "fhme", 32, domains, TrainConfig(batch_size=4), 32,
                           reroute=True)


def test_row_adapters_on_a_fractalmoe_run_in_memory(corpora) -> None:
    """``finetune_in_memory`` drives a FractalMoE run as it does GPT-2: a hashed memory beside
    each FHME layer, LoRA's count of rows learning a step (never a row the base's sample read),
    the base's own split reported."""
    from fractalmoe.adapters import AdaptedFFN
    from fractalmoe.finetune import Domain, finetune_in_memory, kept_domains, lineage

    model, config, _ = load_model_from_run(corpora["run"])
    seq_len = config.model.seq_len
    domains = [Domain(str(corpora["code"]), load_domain(str(corpora["code"]), 0.1, seq_len)),
               *kept_domains(lineage(corpora["run"]), None)]
    row = finetune_in_memory(model, "rows", 16, domains, TrainConfig(batch_size=4, max_steps=3, expert_lr=0.5),
                             seq_len, experts=4096, fit_keys=True)
    assert [type(b.ffn) for b in model.blocks] == [AdaptedFFN] * config.model.n_layers
    assert row["val_bpb"] < row["val_bpb_before"] and row["base_val_bpb_before"] > 0
    assert row["trainable_params"] == row["fhme_params"] <= row["lora_params"]
    assert all(0 < n for n in row["trained_rows"].values())


def _err(capsys, *args: str) -> str:
    assert main(["finetune", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_bad_base_is_a_one_line_error(corpora, tmp_path: Path, capsys) -> None:
    data = str(corpora["code"])
    out = tmp_path / "never"
    missing = str(tmp_path / "missing")
    assert "not a FractalMoE run" in _err(capsys, "--base", missing, "--data", data, "--out", str(out))
    assert "not a FractalMoE run" in _err(capsys, "--base", data, "--data", data, "--out", str(out))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    assert "not a FractalMoE run" in _err(capsys, "--base", str(tmp_path / "hf"), "--data", data, "--out", str(out))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert "not valid JSON" in _err(capsys, "--base", str(tmp_path / "bad"), "--data", data, "--out", str(out))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((corpora["run"] / "config.json").read_text())
    assert "no complete checkpoint" in _err(capsys, "--base", str(empty), "--data", data, "--out", str(out))
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    cfg = json.loads((corpora["run"] / "config.json").read_text())
    (orphan / "config.json").write_text(json.dumps({**cfg, "base": str(tmp_path / "gone")}))
    shutil.copytree(latest_checkpoint(corpora["run"]).parent, orphan / latest_checkpoint(corpora["run"]).parent.name)
    assert "gone" in _err(capsys, "--base", str(orphan), "--data", data, "--out", str(out))
    assert "only for --adapter fhme or memory" in _err(capsys, "--base", str(corpora["run"]), "--data", data,
                                                       "--adapter", "lora", "--sparse-rows", "4")
    assert "needs --sparse-rows" in _err(capsys, "--base", str(corpora["run"]), "--data", data,
                                         "--adapter", "memory")
    assert "--rows-per-step: only for --adapter memory" in _err(
        capsys, "--base", str(corpora["run"]), "--data", data, "--adapter", "fhme", "--sparse-rows", "4",
        "--rows-per-step")
    assert "do not hold the embeddings" in _err(capsys, "--base", str(corpora["run"]), "--data", data, "--adapter",
                                                "memory", "--match-lora-rank", "1", "--with-embeddings")
    assert "--with-embeddings: only for --adapter fhme or memory" in _err(
        capsys, "--base", str(corpora["run"]), "--data", data, "--adapter", "lora", "--with-embeddings")
    assert "--rows-by-gain chooses the rows of each step: add --rows-per-step" in _err(
        capsys, "--base", str(corpora["run"]), "--data", data, "--adapter", "memory", "--sparse-rows", "4",
        "--rows-by-gain")
    assert "deferred_table_grads" in _err(capsys, "--base", str(corpora["run"]), "--data", data,
                                          "--adapter", "memory", "--sparse-rows", "4", "--set",
                                          "deferred_table_grads=true", "--out", str(out))
    assert "rank" in _err(capsys, "--base", str(corpora["run"]), "--data", data, "--adapter", "lora",
                          "--lora-rank", "33", "--out", str(out))
    assert not out.exists()


def test_options_that_do_not_apply_are_one_line_errors_before_any_run(corpora, tmp_path: Path, capsys) -> None:
    """Layers out of range (every adapter kind), options the adapter would ignore and model
    overrides fail before a run directory is made."""
    out = tmp_path / "never"
    common = ["--base", str(corpora["run"]), "--data", str(corpora["code"]), "--out", str(out)]
    for kind in (["fhme"], ["fhme", "--match-lora-rank", "4"], ["lora"], ["memory", "--sparse-rows", "4"]):
        assert "layers [5] out of range" in _err(capsys, *common, "--adapter", *kind, "--layers", "0,5")
    assert "--layers: not for --adapter full" in _err(capsys, *common, "--adapter", "full", "--layers", "0")
    assert "training fields only" in _err(capsys, *common, "--set", "model.dim=32")
    assert "--experts: only for" in _err(capsys, *common, "--adapter", "memory", "--sparse-rows", "4",
                                         "--experts", "64")
    assert "--depth: only for" in _err(capsys, *common, "--adapter", "full", "--depth", "3")
    assert "--reroute: only for --adapter fhme" in _err(capsys, *common, "--adapter", "lora", "--reroute")
    assert "--attention-experts: only for --adapter fhme" in _err(capsys, *common, "--adapter", "lora",
                                                                  "--attention-experts", "16")
    assert "perfect square" in _err(capsys, *common, "--attention-experts", "20")
    assert "not with --sparse-rows" in _err(capsys, *common, "--attention-experts", "16", "--sparse-rows", "4")
    assert "--attention-lora: only for --adapter fhme" in _err(capsys, *common, "--adapter", "lora",
                                                               "--attention-lora", "4")
    assert "not with --sparse-rows" in _err(capsys, *common, "--attention-lora", "4", "--sparse-rows", "4")
    assert "width / 2" in _err(capsys, *common, "--match-lora-rank", "4", "--attention-lora", "65")
    assert "--heads, --topk: only for" in _err(capsys, *common, "--adapter", "memory", "--sparse-rows", "4",
                                                "--heads", "1", "--topk", "4")
    assert "without --lora-rank" in _err(capsys, *common, "--adapter", "lora", "--lora-rank", "4", "--experts", "64")
    err = _err(capsys, *common, "--adapter", "lora", "--lora-targets", "attention", "--lora-rank", "65")
    assert "1..64" in err and "attention" in err and "width / 2" not in err  # the cap of attention targets
    assert not out.exists()


def _sweep_point(lr: float, bpb: float, rise: float, method: str = "lora") -> dict:
    return {"lr": lr, "expert_lr": 0.0, "val_bpb": bpb, "val_bpb_before": 6.8, "base_val_bpb": 2.0 + rise,
            "base_val_bpb_before": 2.0, "trainable_params": 10, "method": method, "seed": 2}


def test_forgetting_curve_skips_rates_beaten_on_both_axes(load_benchmark) -> None:
    """A learning rate that learns less and forgets more than a gentler one (here one that
    diverged) must not bend the curve the matched-gain rise is read from."""
    table, run = load_benchmark("finetune_table"), _sweep_point
    pts = table.curve([run(1e-3, 3.0, 1.0), run(1e-2, 2.8, 1.5), run(3e-2, 4.5, 2.9)])
    assert [p[0][0] for p in pts] == [1e-2, 1e-3, 0.0]
    rise, clamped = table.at_bpb(pts, 4.0)
    assert not clamped and rise == pytest.approx(1.0 * (6.8 - 4.0) / (6.8 - 3.0))
    assert table.at_bpb(pts, 2.9)[0] == pytest.approx(1.25)
    # Two rates that end at the same point beat neither each other nor the curve.
    assert len(table.curve([run(1e-3, 3.0, 1.0), run(3e-3, 3.0, 1.0)])) == 3


def test_forgetting_read_at_levels(load_benchmark) -> None:
    """Each method's rise at a chosen new-domain bpb is read along its own curve through the
    untrained start, floored at 0.01, and set against LoRA's and full fine-tuning's there."""
    table, run = load_benchmark("finetune_table"), _sweep_point
    rows = [run(1e-3, 3.8, 0.4), run(1e-2, 3.0, 1.2), run(1e-4, 3.8, 0.1, "full"), run(1e-3, 3.0, 0.3, "full"),
            run(0.1, 4.8, 0.001, "memory"), run(1.0, 3.4, 0.2, "memory")]
    out = table.levels_table(rows, "t", [4.8, 3.4])
    lora_48, full_48 = 0.4 * 2.0 / 3.0, 0.1 * 2.0 / 3.0  # 4.8 lies between the start (6.8) and 3.8
    lora_34, full_34 = 0.4 + 0.8 * 0.4 / 0.8, 0.1 + 0.2 * 0.4 / 0.8
    assert f"| memory | 0.010 ({0.01 / lora_48:.2f}, {0.01 / full_48:.2f}) | " \
           f"0.200 ({0.2 / lora_34:.2f}, {0.2 / full_34:.2f}) |" in out
    assert f"| lora | {lora_48:.3f} (1.00, {lora_48 / full_48:.2f}) |" in out


def test_a_run_read_at_several_gate_priors_is_one_row_per_prior(load_benchmark) -> None:
    """``bpb_by_prior`` (``finetune_gpt2.py --priors``): each prior becomes a method of its own,
    with that prior's new-domain and base bpb, and every prior a point of one more method,
    ``+gates``, whose curve is the best (rate, prior) pair at each level; adapters gated only
    after training keep their own (ungated) row; a run without priors passes through unchanged."""
    table = load_benchmark("finetune_table")
    row = {**_sweep_point(1e-3, 2.7, 1.1, "fhme"), "bpb_by_prior": {"0": [3.1, 2.01], "4": [2.9, 2.08]}}
    rows = table.readings(row)
    assert [(r["method"], r["val_bpb"], r["base_val_bpb"]) for r in rows] == [
        ("fhme", 2.7, 3.1), ("fhme+gate@0", 3.1, 2.01), ("fhme+gates", 3.1, 2.01),
        ("fhme+gate@4", 2.9, 2.08), ("fhme+gates", 2.9, 2.08)]
    assert all(r["val_bpb_before"] == 6.8 and r["base_val_bpb_before"] == 2.0 for r in rows)
    assert [r["method"] for r in table.readings({**row, "domain_gate": True})] == [
        "fhme+gate@0", "fhme+gates", "fhme+gate@4", "fhme+gates"]
    assert table.readings(_sweep_point(1e-3, 3.0, 1.0)) == [_sweep_point(1e-3, 3.0, 1.0)]
    other = {**_sweep_point(3e-3, 2.6, 1.2, "fhme"), "bpb_by_prior": {"0": [3.0, 2.005], "4": [2.7, 2.3]}}
    both = table.by_method([r for x in (row, other) for r in table.readings(x)])
    pts = table.curve(both["fhme+gates"])  # 3e-3 at prior 0 beats 1e-3 at prior 0 on both axes
    assert [(p[0], p[1], round(p[2], 6)) for p in pts] == [
        ((3e-3, 0.0, 4.0), 2.7, 0.3), ((1e-3, 0.0, 4.0), 2.9, 0.08), ((3e-3, 0.0, 0.0), 3.0, 0.005),
        ((0.0, 0.0), 6.8, 0.0)]


def test_a_run_read_as_a_mixture_with_its_base_is_a_row_of_its_own(load_benchmark) -> None:
    table = load_benchmark("finetune_table")
    row = {**_sweep_point(1e-3, 2.7, 1.1, "lora"), "bpb_mixed": [2.705, 2.004]}
    assert [(r["method"], r["val_bpb"], r["base_val_bpb"]) for r in table.readings(row)] == [
        ("lora", 2.7, 3.1), ("lora+mix", 2.705, 2.004)]


def test_levels_apply_to_every_domain_or_to_the_one_named(load_benchmark) -> None:
    table = load_benchmark("finetune_table")
    specs = [table.level(s) for s in ("3.8", "email:3.5", "kjv:2.3")]
    assert table.domain_levels(specs, "email") == [3.8, 3.5]
    assert table.domain_levels(specs, "kjv") == [3.8, 2.3]
    with pytest.raises(SystemExit) as exc:
        table.main(["finetune.jsonl", "--levels", "email:x"])
    assert exc.value.code == 2


def test_sequential_table_reads_each_stage_from_its_own_run(load_benchmark) -> None:
    """The second stage's rises come from its own before/after fields, the rise since the base
    from the first stage's run, and the email bpb at both ends is shown beside them."""
    table = load_benchmark("finetune_table")
    first = {"run_dir": "runs/x/email_lora_s2", "base_val_bpb_before": 2.0, "method": "lora", "seed": 2}
    second = {"base": "/abs/runs/x/email_lora_s2", "method": "lora", "seed": 2, "val_bpb": 2.2,
              "base_val_bpb_before": 2.5, "base_val_bpb": 2.6,
              "prior_val_bpb_before": [3.0], "prior_val_bpb": [4.5]}
    out = table.sequential_table([second], [first])
    assert "| lora | 3.0000, 4.5000 | 2.2000 | 1.5000 | 0.1000 | 0.6000 | 1.5000 (s2) |" in out


def test_domain_gate_is_the_causal_posterior_of_the_rows_a_token_reads() -> None:
    """sigmoid of the prior plus the running sum of each token's mean row llr over its first
    block's reads, recomputed here by hand; a later position never moves an earlier gate."""
    from fractalmoe import FHME
    from fractalmoe.sparse_rows import DomainGate, freeze_routing, set_gate_prior

    torch.manual_seed(0)
    layer = FHME(16, 256, depth=2, heads=2, topk=4, key_dim=8, block="value")
    freeze_routing(layer)
    llr = torch.randn(256)
    block = layer.fractal.blocks[0]
    gate = DomainGate(block.norm, block.memory.router, llr)
    x = torch.randn(3, 10, 16)
    g = gate(x)
    _, idx = block.memory.router(block.norm(x.reshape(-1, 16)))  # (30, heads, topk)
    evidence = llr[idx].reshape(3, 10, -1).mean(-1)
    torch.testing.assert_close(g.squeeze(-1), torch.sigmoid(evidence.cumsum(-1)))
    set_gate_prior(torch.nn.Sequential(gate), 1.5)  # prior odds e^1.5 for the new domain, moved after the fact
    torch.testing.assert_close(gate(x).squeeze(-1), torch.sigmoid(1.5 + evidence.cumsum(-1)))
    set_gate_prior(gate, 0.0)
    y = x.clone()
    y[:, 6:] = torch.randn(3, 4, 16)
    torch.testing.assert_close(gate(y)[:, :6], g[:, :6], rtol=0, atol=0)
    with pytest.raises(ValueError, match="whole sequences"):
        gate(x[0])


def test_row_llr_compares_read_shares_with_half_counts_added() -> None:
    from fractalmoe.sparse_rows import row_llr

    new, kept = torch.tensor([3, 0, 1]), torch.tensor([0, 2, 2])
    want = [torch.log(torch.tensor((n + 0.5) / 5.5)) - torch.log(torch.tensor((k + 0.5) / 5.5))
            for n, k in zip(new.tolist(), kept.tolist())]
    torch.testing.assert_close(row_llr(new, kept), torch.stack(want))


@pytest.mark.parametrize("method", ["rows", "fhme"])
def test_domain_gated_adapters_open_on_the_new_domain_and_stay_shut_on_the_base(corpora, method) -> None:
    """``finetune_in_memory(..., domain_gate=True)``: every row adapter or FHME adapter gets a
    gate, and after training the gates stand wider on the new domain's text than on the base's.
    An FHME adapter's gate has frozen routing of its own, of a row adapter's size."""
    from fractalmoe.adapters import AdaptedFFN, max_lora_rank
    from fractalmoe.evaluate import lm_logits
    from fractalmoe.finetune import Domain, finetune_in_memory, kept_domains, lineage
    from fractalmoe.sparse_rows import GATE_ROUTING

    model, config, _ = load_model_from_run(corpora["run"])
    seq_len = config.model.seq_len
    domains = [Domain(str(corpora["code"]), load_domain(str(corpora["code"]), 0.1, seq_len)),
               *kept_domains(lineage(corpora["run"]), None)]
    rank = 16 if method == "rows" else max_lora_rank(model)  # an FHME adapter set's smallest count fits
    row = finetune_in_memory(model, method, rank, domains, TrainConfig(batch_size=4, max_steps=3, expert_lr=0.5),
                             seq_len, experts=4096, max_kept_windows=None, domain_gate=True)
    assert row["domain_gate"] and row["val_bpb"] < row["val_bpb_before"]
    seen: dict[str, list[float]] = {"new": [], "base": []}
    for b in model.blocks:
        assert isinstance(b.ffn, AdaptedFFN) and b.ffn.domain_gate is not None
        if method == "fhme":
            assert b.ffn.domain_gate.router.num_experts == GATE_ROUTING["num_experts"]
            assert not any(p.requires_grad for p in b.ffn.domain_gate.parameters())
    for name, d in zip(seen, domains):
        hooks = [b.ffn.domain_gate.register_forward_hook(lambda m, i, o, n=name: seen[n].append(float(o.mean())))
                 for b in model.blocks]
        with torch.no_grad():
            lm_logits(model.eval(), d.data.train_batch(0, 4, seq_len, 1)[0])
        for h in hooks:
            h.remove()
    assert min(seen["new"]) > 0.5 > max(seen["base"])


def test_cli_domain_gate_is_fitted_saved_counted_and_generates_without_a_cache(corpora, capsys) -> None:
    """``finetune --domain-gate``: the adapters train without gates, then each gets one fitted on
    the trained model (as ``fit_domain_gates`` fits it by hand here), saved in a file of the run's own
    beside checkpoints that hold none, at its prior; the reloaded model counts the gates' routing in
    its FLOPs and generates, re-reading the context at every step, what greedy decoding by hand
    gives. Other adapters, and a prior without gates, are refused."""
    from fractalmoe.adapters import build_adapted_model
    from fractalmoe.checkpoint import latest_checkpoint, load_model_checkpoint, read_model_tensors, run_extra
    from fractalmoe.data import ByteDataset
    from fractalmoe.sparse_rows import DomainGate, fit_domain_gates

    out = corpora["root"] / "domain_gate"
    s = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--experts", "64",
                  "--domain-gate", "--gate-prior", "2.5", "--out", str(out))
    assert s["val_bpb"] < s["val_bpb_before"]
    model, config, _ = load_model_from_run(out)
    gates = [b.ffn.domain_gate for b in model.blocks]
    assert all(isinstance(g, DomainGate) and g.llr.abs().sum() > 0 and g.prior == 2.5 for g in gates)
    assert (out / "domain_gates.safetensors").is_file()
    assert not any("domain_gate" in k for k in read_model_tensors(latest_checkpoint(out)))
    spec = {k: v for k, v in run_extra(out)["adapter"].items() if k != "domain_gate"}
    by_hand = build_adapted_model(str(corpora["run"]), spec)
    load_model_checkpoint(by_hand, latest_checkpoint(out))
    seq_len, batch, val = config.model.seq_len, config.train.batch_size, config.train.val_fraction
    refit = [(b.ffn, DomainGate(g.norm, g.router, torch.zeros_like(g.llr))) for b, g in zip(by_hand.blocks, gates)]
    fit_domain_gates(by_hand, refit, ByteDataset.load(str(corpora["code"]), val, seq_len),
                     [ByteDataset.load(str(corpora["base"]), val, seq_len)], seq_len, batch, config.train.seed)
    for g, (_, h) in zip(gates, refit):
        torch.testing.assert_close(g.llr, h.llr, rtol=0, atol=0)
    ungated = model.flops_per_token()
    for b in model.blocks:
        b.ffn.domain_gate = None
    assert ungated - model.flops_per_token() == sum(g.router.flops_per_token() for g in gates)
    for b, g in zip(model.blocks, gates):
        b.ffn.domain_gate = g
    model.eval()
    idx = torch.randint(0, 256, (2, config.model.seq_len - 3), generator=torch.Generator().manual_seed(0))
    seq = idx
    with torch.no_grad():
        for _ in range(6):  # past the context: the window slides
            seq = torch.cat([seq, model(seq[:, -config.model.seq_len:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(idx, 6, temperature=0), seq)
    assert "--domain-gate: only for --adapter fhme" in _err(
        capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--adapter", "lora",
        "--domain-gate", *FT)
    assert "add --domain-gate" in _err(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]),
                                       "--gate-prior", "1", *FT)
    assert "finite" in _err(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]),
                            "--domain-gate", "--gate-prior", "inf", *FT)


def _assert_gated_run(model, sites: list, run_dir: Path, base_run: Path) -> torch.Tensor:
    """A gated adapter run loaded from ``run_dir``: every site holds a fitted gate, whose routing
    the FLOPs add to the same run ungated; at a prior below all evidence it is the base, far above
    it the ungated run. Returns the input it was read on."""
    from fractalmoe.checkpoint import load_model_checkpoint, run_extra
    from fractalmoe.sparse_rows import DomainGate, set_gate_prior

    assert all(isinstance(m.domain_gate, DomainGate) and m.domain_gate.llr.abs().sum() > 0 for m in sites)
    spec = {k: v for k, v in run_extra(run_dir)["adapter"].items() if k != "domain_gate"}
    ungated = build_adapted_model(str(base_run), spec)
    load_model_checkpoint(ungated, latest_checkpoint(run_dir))
    assert model.flops_per_token() - ungated.eval().flops_per_token() == sum(
        m.domain_gate.router.flops_per_token() for m in sites)
    base, _, _ = load_model_from_run(base_run)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for prior, want in ((-1e4, base(idx)), (1e4, ungated(idx))):
            set_gate_prior(model, prior)
            torch.testing.assert_close(model(idx), want, rtol=0, atol=1e-5)
    return idx


def test_cli_domain_gate_covers_attention_experts_and_lora_and_a_later_stage(corpora, capsys) -> None:
    """``finetune --domain-gate`` with ``--attention-experts`` and ``--attention-lora``: every update
    that trained (FFN adapter, attention-input adapter, LoRA on each attention projection) sits
    behind a gate of its own, counted in the FLOPs; the reloaded run at a prior below all evidence
    is the base, far above it the ungated run. A second gated stage over it keeps the first stage's
    gated LoRA unmerged and starts exactly at the first stage's model; LoRA there again is refused,
    since gated LoRA cannot be merged."""
    from fractalmoe.adapters import GatedLoRA
    from fractalmoe.sparse_rows import DomainGate

    a_dir = corpora["root"] / "gated_attention_lora"
    args = ["--match-lora-rank", "32", "--heads", "1", "--topk", "6", "--attention-experts", "16",
            "--attention-lora", "8", "--domain-gate"]
    a = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), *args, "--out", str(a_dir))
    model, config, _ = load_model_from_run(a_dir)
    lora = [m for m in model.modules() if isinstance(m, GatedLoRA)]
    sites = [b.ffn for b in model.blocks] + [b.attn for b in model.blocks] + lora
    assert len(lora) == 2 * len(model.blocks)  # qkv and the output projection
    idx = _assert_gated_run(model, sites, a_dir, corpora["run"])
    b_dir = corpora["root"] / "over_gated"
    b = _finetune(capsys, "--base", str(a_dir), "--data", str(corpora["prose"]), "--match-lora-rank", "32",
                  "--heads", "1", "--topk", "6", "--domain-gate", "--out", str(b_dir))
    assert b["prior_val_bpb_before"][0] == pytest.approx(a["val_bpb"], abs=1e-4)
    second, _, _ = load_model_from_run(b_dir)  # the first stage's gated LoRA kept, the new set gated too
    assert sum(isinstance(m, GatedLoRA) for m in second.modules()) == len(lora)
    assert all(isinstance(b.ffn.domain_gate, DomainGate) and isinstance(b.ffn.base.domain_gate, DomainGate)
               for b in second.blocks)
    first, _, _ = load_model_from_run(a_dir)
    stacked = build_adapted_model(str(a_dir), {"kind": "fhme", "fhme": {"num_experts": b["fhme_experts"], "heads": 1,
                                                                        "topk": 6}})
    assert trainable_parameter_count(stacked) == b["trainable_params"]
    with torch.no_grad():
        torch.testing.assert_close(stacked(idx), first(idx), rtol=0, atol=1e-5)
    assert "cannot be merged" in _err(capsys, "--base", str(a_dir), "--data", str(corpora["prose"]),
                                      "--match-lora-rank", "32", "--heads", "1", "--topk", "6", "--attention-lora", "4",
                                      "--out", str(corpora["root"] / "never_gated"), *FT)
    assert not (corpora["root"] / "never_gated").exists()


def test_eval_mix_lineage_scores_the_posterior_mixture_of_every_stage(corpora, capsys) -> None:
    from fractalmoe.checkpoint import load_run_config
    from fractalmoe.mixture import PosteriorMixture

    a_dir, b_dir = corpora["root"] / "mix_a", corpora["root"] / "mix_b"
    _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), "--experts", "64",
              "--out", str(a_dir))
    _finetune(capsys, "--base", str(a_dir), "--data", str(corpora["prose"]), "--adapter", "lora",
              "--lora-rank", "8", "--out", str(b_dir))
    assert main(["eval", "--ckpt", str(b_dir), "--mix-lineage", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    models = [load_model_from_run(r)[0] for r in (corpora["run"], a_dir, b_dir)]
    config = load_run_config(b_dir)
    data = load_domain(str(corpora["prose"]), config.train.val_fraction, config.model.seq_len)
    want = val_bpb(PosteriorMixture(models), data, config.model.seq_len, config.train.batch_size)
    assert got["val_bpb"] == pytest.approx(want, rel=1e-6) and len(got["mixture"]) == 3
    assert got["val_bpb"] <= min(val_bpb(m, data, config.model.seq_len, config.train.batch_size)
                                 for m in models) + math.log2(3) / config.model.seq_len + 1e-6  # a window's bound
    assert main(["eval", "--ckpt", str(corpora["run"]), "--mix-lineage"]) == 2
    assert "not a fine-tuning run" in capsys.readouterr().err
    assert main(["generate", "--ckpt", str(b_dir), "--mix-lineage", "--prompt", "In the", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    greedy = PosteriorMixture(models).generate(torch.tensor([list(b"In the")]), 8, temperature=0)
    assert capsys.readouterr().out == bytes(greedy[0].tolist()).decode("utf-8", "replace") + "\n"


def test_cli_domain_gate_covers_a_change_to_the_embeddings(corpora, capsys) -> None:
    """``finetune --with-embeddings --domain-gate`` with FHME adapters: a change to the tied
    embeddings trains within the same count and sits behind two gates of its own (one reading the
    base's embeddings, one the head's input), counted in the FLOPs; the reloaded run at a prior
    below all evidence is the base, far above it the ungated run, and it generates."""
    from fractalmoe.adapters import GatedEmbedding, GatedHead
    from fractalmoe.sparse_rows import DomainGate

    a_dir = corpora["root"] / "gated_embeddings"
    args = ["--match-lora-rank", "32", "--heads", "1", "--topk", "4", "--with-embeddings", "--domain-gate"]
    a = _finetune(capsys, "--base", str(corpora["run"]), "--data", str(corpora["code"]), *args, "--out", str(a_dir))
    model, _, _ = load_model_from_run(a_dir)
    assert isinstance(model.embed, GatedEmbedding) and isinstance(model.head, GatedHead)
    assert model.head.delta is model.embed.delta and model.embed.delta.abs().sum() > 0
    sites = [b.ffn for b in model.blocks] + [model.embed, model.head]
    assert a["trainable_params"] <= a["lora_params"] and a["with_embeddings"]
    _assert_gated_run(model, sites, a_dir, corpora["run"])
    assert main(["generate", "--ckpt", str(a_dir), "--prompt", "def ", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    b_dir = corpora["root"] / "gated_embeddings_again"  # a second change over the first, kept as it is
    b = _finetune(capsys, "--base", str(a_dir), "--data", str(corpora["prose"]), *args, "--out", str(b_dir))
    assert b["prior_val_bpb_before"][0] == pytest.approx(a["val_bpb"], abs=1e-4)
    second, _, _ = load_model_from_run(b_dir)
    assert isinstance(second.embed.base, GatedEmbedding) and second.head.base.delta is second.embed.base.delta
    assert isinstance(second.embed.domain_gate, DomainGate) and isinstance(second.embed.base.domain_gate, DomainGate)
