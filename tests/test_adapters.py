"""FHME adapters on FractalMoE and on randomly initialised transformers GPT-2 / Llama models."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from fractalmoe import FHMELanguageModel
from fractalmoe.adapters import (
    AdaptedAttention,
    add_fhme_adapters,
    decoder_layers,
    lora_parameter_count,
    lora_targets,
    trainable_parameter_count,
)
from fractalmoe.cli import main
from fractalmoe.config import RunConfig, TrainConfig, tiny_model_config
from fractalmoe.experts import BLOCK_KINDS
from fractalmoe.optim import ModelOptimizer
from fractalmoe.train import run

transformers = pytest.importorskip("transformers")

ADAPTER = dict(num_experts=256, depth=2, heads=2, topk=4, key_dim=16)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _train(model, logits_of, steps: int = 12) -> list[float]:
    opt = ModelOptimizer(model, lr=1e-2, expert_lr=0.1, weight_decay=0.0)
    idx = torch.randint(0, 256, (4, 32))
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        logits = logits_of(model, idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_hf_models_start_identical_train_and_generate(build) -> None:
    model = build()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(idx).logits
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = add_fhme_adapters(model, **ADAPTER)
    assert len(adapters) == 2
    added: list[torch.Tensor] = []
    hooks = [a.register_forward_hook(lambda m, args, out: added.append(out)) for a in adapters]
    with torch.no_grad():
        after = model(idx).logits
    for h in hooks:
        h.remove()
    # Each adapter adds exactly zero at init. The logits are compared at float32 tolerance: in a
    # fresh two-thread process the base's recomputation once differed in the last bits (7e-7).
    assert len(added) == 2 and all(torch.count_nonzero(y) == 0 for y in added)
    torch.testing.assert_close(after, before)
    losses = _train(model, lambda m, x: m(x).logits)
    assert losses[-1] < losses[0]
    state = model.state_dict()
    for k, v in base.items():  # every base weight bit-identical (found under the wrapper's name)
        key = k if k in state else k.replace("mlp.", "mlp.base.")
        assert torch.equal(state[key], v), k
    model.eval()
    out = model.generate(idx[:, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 9)


@pytest.mark.parametrize("block", BLOCK_KINDS)
def test_adapters_of_every_block_kind_add_zero_at_init(block: str) -> None:
    model = _gpt2()
    idx = torch.randint(0, 256, (2, 16))
    added: list[torch.Tensor] = []
    for a in add_fhme_adapters(model, **ADAPTER, block=block):
        a.register_forward_hook(lambda m, args, out: added.append(out))
    with torch.no_grad():
        model(idx)
    assert len(added) == 2 and all(torch.count_nonzero(y) == 0 for y in added)


def test_fractalmoe_model_adapters_change_only_adapter_weights() -> None:
    model = FHMELanguageModel(tiny_model_config(ffn="dense"))
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(idx)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_fhme_adapters(model, layers=[1], **ADAPTER)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, rtol=0, atol=0)
    losses = _train(model, lambda m, x: m(x))
    assert losses[-1] < losses[0]
    state = model.state_dict()
    for k, v in base.items():
        key = k if k in state else k.replace("ffn.", "ffn.base.")
        assert torch.equal(state[key], v), k
    assert sum(p.requires_grad for p in model.parameters()) > 0
    assert len(decoder_layers(model)) == 2


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_attention_adapters_start_at_zero_then_move_what_attention_reads(build) -> None:
    """attention(x + FHME(x)) on a transformers model: found under the model's own name, exactly
    the base at init, then the attention-side adapters learn and the base stays bit-identical."""
    model = build()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(idx).logits
    base = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = add_fhme_adapters(model, **ADAPTER, attention=dict(num_experts=64, topk=2))
    at_attention = adapters[2:]
    assert len(adapters) == 4 and all(a.fractal.bank.num_experts == 64 for a in at_attention)
    attention = [m for m in model.modules() if isinstance(m, AdaptedAttention)]
    assert [m.adapter for m in attention] == at_attention
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, before)
    tables = [a.fractal.bank.tables()["up"].detach().clone() for a in at_attention]
    losses = _train(model, lambda m, x: m(x).logits)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a.fractal.bank.tables()["up"], t) for a, t in zip(at_attention, tables))
    state = model.state_dict()
    name = ".self_attn." if build is _llama else ".attn."
    for k, v in base.items():
        key = k if k in state else k.replace(".mlp.", ".mlp.base.").replace(name, name + "base.")
        assert torch.equal(state[key], v), k
    model.eval()
    assert model.generate(idx[:, :4], max_new_tokens=5, do_sample=False).shape == (2, 9)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_attention_lora_beside_fhme_adapters_keeps_both_learning(build) -> None:
    """FHME adapters beside the MLP and LoRA on the attention projections: exactly the base at
    init; both sets learn (peft's injection freezes nothing that was learning), with exactly
    their own trainable counts; the base stays bit-identical."""
    model = build()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(idx).logits
    base = [(p, p.detach().clone()) for p in model.parameters()]  # peft keeps them, moved under base_layer
    targets = lora_targets(model, which="attention")
    adapters = add_fhme_adapters(model, **ADAPTER, attention_lora=4)
    assert len(adapters) == 2
    fhme = sum(p.numel() for a in adapters for p in a.parameters())
    assert all(p.requires_grad for a in adapters for p in a.parameters())
    assert trainable_parameter_count(model) == fhme + lora_parameter_count(targets, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, before)
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    tables = [a.fractal.bank.tables()["up"].detach().clone() for a in adapters]
    losses = _train(model, lambda m, x: m(x).logits)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a.fractal.bank.tables()["up"], t) for a, t in zip(adapters, tables))
    assert all(not torch.equal(dict(model.named_parameters())[n], p) for n, p in lora_b.items())
    assert all(torch.equal(p, was) for p, was in base)
    with pytest.raises(ValueError, match="width / 2"):
        add_fhme_adapters(build(), **ADAPTER, attention_lora=17)


def test_attention_adapters_keep_cached_generation_exact_and_are_counted() -> None:
    """On a FractalMoE model the attention-side FHME is position-wise: greedy decoding with the KV
    cache equals recomputing every prefix; FLOPs and active parameters count each adapter, of
    every stacked set (a second fine-tuning stage wraps the first)."""
    model = FHMELanguageModel(tiny_model_config(seq_len=48)).eval()
    flops, active = model.flops_per_token(), model.active_params_per_token()
    adapters = add_fhme_adapters(model, **ADAPTER, attention=dict(num_experts=64, topk=2))
    adapters += add_fhme_adapters(model, stack=True, **ADAPTER, attention=dict(num_experts=16, topk=2))
    assert all(isinstance(b.attn.base, AdaptedAttention) for b in model.blocks)
    with torch.no_grad():
        for a in adapters:
            a.fractal.bank.tables()["up"].normal_(std=0.5)
    assert model.flops_per_token() == pytest.approx(flops + sum(a.flops_per_token() for a in adapters))
    assert model.active_params_per_token() == pytest.approx(
        active + sum(a.active_params_per_token() for a in adapters))
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 24, temperature=0.0)
    ref = prompt
    with torch.no_grad():
        for _ in range(24):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_finetune_cli_writes_adapter_only_run_and_eval_generate_load_it(tmp_path: Path, capsys) -> None:
    data = tmp_path / "a.txt"
    data.write_text("All the world's a stage, and all the men and women merely players.\n" * 40)
    other = tmp_path / "b.txt"
    other.write_text("def f(x):\n    return x * 2\n\nclass A:\n    pass\n" * 60)
    base = tmp_path / "base"
    cfg = RunConfig(tiny_model_config(), TrainConfig(batch_size=4, max_steps=4, eval_every=4,
                                                     sample_bytes=0))
    run(cfg, out=base, data_path=str(data), progress=False, log=lambda s: None)
    for kind in ("fhme", "lora", "full"):
        out = tmp_path / kind
        size = ["--experts", "256"] if kind != "full" else []
        assert main(["finetune", "--base", str(base), "--data", str(other), "--adapter", kind,
                     "--out", str(out), "--max-steps", "3", *size, "--quiet", "--set", "batch_size=4"]) == 0
        extra = json.loads((out / "config.json").read_text())
        assert extra["base"] == str(base.resolve()) and extra["adapter"]["kind"] == kind
        assert main(["eval", "--ckpt", str(out), "--json"]) == 0
        assert main(["generate", "--ckpt", str(out), "--prompt", "def", "--max-new-tokens", "8"]) == 0
    capsys.readouterr()
    from safetensors.torch import load_file

    fhme_tensors = load_file(str(next((tmp_path / "fhme" / "checkpoints").glob("step_*")) / "model.safetensors"))
    assert fhme_tensors and all(".adapter." in k for k in fhme_tensors)


def test_export_hf_round_trip_gives_identical_logits(tmp_path: Path, capsys) -> None:
    data = tmp_path / "a.txt"
    data.write_text("Friends, Romans, countrymen, lend me your ears.\n" * 40)
    cfg = RunConfig(tiny_model_config(), TrainConfig(batch_size=4, max_steps=2, eval_every=2,
                                                     sample_bytes=0))
    run(cfg, out=tmp_path / "run", data_path=str(data), progress=False, log=lambda s: None)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    ours, hf, idx = _exported_logits_match(tmp_path / "run", tmp_path / "hf")
    assert hf.model.head.weight is hf.model.embed.weight  # stored once, tied back on load
    from fractalmoe.optim import split_parameters

    tables = split_parameters(hf)[0]  # however transformers materialised them, the row rule finds them
    assert len(tables) == len(split_parameters(ours)[0]) > 0
    prompt = idx[:, :5]  # transformers' own generate, greedy, within the context: as ours
    out = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ours.eval().generate(prompt, 12, temperature=0.0))


def test_export_hf_refuses_adapter_runs_and_exports_runs_that_tuned_the_base_weights(tmp_path: Path,
                                                                                   capsys) -> None:
    """FHME adapters would be dropped on load (NaN logits); memory fine-tuning keeps the plain
    model's tensors and exports exactly."""
    data = tmp_path / "a.txt"
    data.write_text("Friends, Romans, countrymen, lend me your ears.\n" * 40)
    other = tmp_path / "b.txt"
    other.write_text("def f(x):\n    return x * 2\n" * 60)
    cfg = RunConfig(tiny_model_config(), TrainConfig(batch_size=4, max_steps=2, eval_every=2, sample_bytes=0))
    run(cfg, out=tmp_path / "base", data_path=str(data), progress=False, log=lambda s: None)
    for kind, extra in (("fhme", ["--experts", "64"]), ("memory", ["--sparse-rows", "4"])):
        assert main(["finetune", "--base", str(tmp_path / "base"), "--data", str(other), "--adapter", kind,
                     *extra, "--out", str(tmp_path / kind), "--max-steps", "2", "--quiet",
                     "--set", "batch_size=4"]) == 0
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "fhme"), str(tmp_path / "hf_fhme")]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported" in err and str((tmp_path / "base").resolve()) in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "hf_fhme").exists()
    assert main(["export-hf", str(tmp_path / "memory"), str(tmp_path / "hf_memory")]) == 0
    _exported_logits_match(tmp_path / "memory", tmp_path / "hf_memory")


def _exported_logits_match(run_dir: Path, hf_dir: Path) -> tuple:
    """(our model, the exported one, the input) after checking both give the same logits."""
    from fractalmoe.checkpoint import load_model_from_run

    ours, _, _ = load_model_from_run(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True)
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx), rtol=0, atol=0)
    return ours, hf, idx


def _unique_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct tensor storages (each counted once, however many names)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in model.state_dict().values()}
    return sum(storages.values())


def test_export_hf_writes_each_tensor_once(tmp_path: Path) -> None:
    data = tmp_path / "a.txt"
    data.write_text("Friends, Romans, countrymen, lend me your ears.\n" * 40)
    model_cfg = tiny_model_config(fractal_depth=2, num_experts=4096, dim=64, n_heads=2)
    cfg = RunConfig(model_cfg, TrainConfig(batch_size=4, max_steps=1, eval_every=1, sample_bytes=0))
    run(cfg, out=tmp_path / "run", data_path=str(data), progress=False, log=lambda s: None)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    from fractalmoe.checkpoint import load_model_from_run

    ours, _, _ = load_model_from_run(tmp_path / "run")
    size = (tmp_path / "hf" / "model.safetensors").stat().st_size
    assert size <= 1.1 * _unique_bytes(ours), (size, _unique_bytes(ours))
    aliases = json.loads((tmp_path / "hf" / "config.json").read_text())["fractalmoe_aliases"]
    assert aliases.get("head.weight") == "embed.weight"


def test_export_hf_deduplicates_aliased_expert_tables(tmp_path: Path) -> None:
    """A layer whose blocks also register the shared bank (C + 1 names per table) still exports
    each table once and loads back with identical logits."""
    from safetensors import safe_open

    from fractalmoe.hf_export import export_model

    cfg = tiny_model_config(fractal_depth=2, num_experts=4096, dim=64, n_heads=2, block="neuron")
    model = FHMELanguageModel(cfg).eval()
    for block in model.blocks:
        for routed in block.ffn.fractal.blocks:
            routed.memory.bank = block.ffn.fractal.bank  # a second (registered) name per block
    names = [k for k in model.state_dict() if k.endswith("bank.down")]
    assert len(names) == 3 * cfg.n_layers  # the fractal's and each block's
    export_model(model, cfg, tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    assert path.stat().st_size <= 1.1 * _unique_bytes(model)
    with safe_open(str(path), "pt") as f:
        stored = set(f.keys())
        aliases = json.loads(f.metadata()["fractalmoe_aliases"])
    assert sum(k.endswith("bank.down") for k in stored) == cfg.n_layers
    assert all(f"model.{a}" not in stored and f"model.{s}" in stored for a, s in aliases.items())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    assert hf.model.head.weight is hf.model.embed.weight
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=0, atol=0)


@pytest.mark.parametrize("fit", [False, True])
def test_row_adapters_leave_the_kept_sample_exactly_as_the_base_had_it(fit: bool) -> None:
    """``add_row_adapters`` on GPT-2: after training on new text, the kept domain's sampled
    windows (those whose reads rank the rows) give the base's logits, as every row they read was
    left at zero; rows that learn do, the routing and every base weight stay put. The same with
    the sub-keys fitted to both domains first (``fit_to``)."""
    from fractalmoe.data import ByteDataset
    from fractalmoe.finetune import train_lm
    from fractalmoe.sparse_rows import add_row_adapters, sample_batches

    torch.manual_seed(0)
    model = _gpt2()
    kept = ByteDataset.from_bytes(b"To be, or not to be: that is the question. " * 60, 0.1, 16)
    new = ByteDataset.from_bytes(bytes(range(32, 127)) * 40, 0.1, 16)
    windows = torch.cat([kept.train_batch(s, 8, 16, 1)[0] for s in range(sample_batches(8))])
    with torch.no_grad():
        before = model(windows).logits
    base = {k: v.clone() for k, v in model.state_dict().items()}
    selectors = add_row_adapters(model, [kept], rows=16, seq_len=16, batch_size=8, seed=1,
                                 num_experts=4096, heads=1, topk=4, key_dim=16, fit_to=new if fit else None)
    routing = {k: v.clone() for k, v in model.state_dict().items() if "router" in k or "norm" in k}
    train_lm(model, new, TrainConfig(max_steps=6, lr=1e-2, expert_lr=0.5, batch_size=8, seed=1), 16)
    model.eval()
    with torch.no_grad():
        after = model(windows).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in routing.items())
    assert all(torch.equal(state[k if k in state else k.replace("mlp.", "mlp.base.")], v) for k, v in base.items())
    for sel in selectors.values():
        assert 0 < int(sel.trained.sum()) and not bool((sel.trained & (sel.kept_windows > 0)).any())


def test_gated_row_adapters_learn_their_queries_within_a_budget_and_keep_the_gate_frozen() -> None:
    """``add_row_adapters(gate_on=new, train_queries=True, budget=B)`` on GPT-2: each memory sits
    behind a ``DomainGate``; as many rows learn a step as fit B beside the query projections;
    the queries move in training, the gate's own copy of the routing does not; a cached
    generation step, which shows the gate one position alone, is refused."""
    from fractalmoe.data import ByteDataset
    from fractalmoe.finetune import train_lm
    from fractalmoe.sparse_rows import add_row_adapters, non_table_trainable

    torch.manual_seed(0)
    model = _gpt2()
    kept = ByteDataset.from_bytes(b"To be, or not to be: that is the question. " * 60, 0.1, 16)
    new = ByteDataset.from_bytes(bytes(range(32, 127)) * 40, 0.1, 16)
    with pytest.raises(ValueError, match="one of the two"):
        add_row_adapters(model, [kept], 16, 16, 8, 1, budget=1000)
    selectors = add_row_adapters(model, [kept], None, 16, 8, 1, max_kept_windows=None, num_experts=4096,
                                 heads=1, topk=4, key_dim=16, gate_on=new, train_queries=True, budget=20_000)
    ffns = [b.mlp for b in model.transformer.h]
    queries = sum(m.numel() for f in ffns for b in f.adapter.fractal.blocks for m in b.memory.router.query.parameters())
    joins = sum(p.numel() for f in ffns for j in f.adapter.fractal.joins for p in j.parameters())
    assert non_table_trainable(model) == queries + joins
    width = sum(f.adapter.fractal.bank.values.shape[1] for f in ffns)
    assert all(sel.top == (20_000 - queries - joins) // width for sel in selectors.values())
    gate_state = {k: v.clone() for k, v in model.state_dict().items() if "domain_gate" in k}
    query_state = {k: v.clone() for k, v in model.state_dict().items()
                   if k.endswith("router.query.weight") and "domain_gate" not in k}
    assert gate_state and query_state
    train_lm(model, new, TrainConfig(max_steps=4, lr=1e-2, expert_lr=0.5, batch_size=8, seed=1), 16)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in gate_state.items())
    assert all(not torch.equal(state[k], v) for k, v in query_state.items())
    with pytest.raises(ValueError, match="without a cache"):
        ffns[0](torch.randn(1, 1, 32), None)


def test_spherical_kmeans_converges_to_the_normalised_means_of_its_clusters() -> None:
    """Lloyd's fixed point by cosine: every centroid is a unit vector, the normalised mean of the
    points that pick it; and the fit scores the points better than the random points it starts from."""
    from fractalmoe.sparse_rows import spherical_kmeans

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    points = centres.repeat(50, 1) + 0.1 * torch.randn(300, 8, generator=g)
    start = spherical_kmeans(points, 6, 0, torch.Generator().manual_seed(1))
    fit = spherical_kmeans(points, 6, 50, torch.Generator().manual_seed(1))
    units = torch.nn.functional.normalize(points, dim=-1)
    torch.testing.assert_close(fit.norm(dim=-1), torch.ones(6))
    best = (units @ fit.T).argmax(-1)
    for c in best.unique():
        torch.testing.assert_close(fit[c], torch.nn.functional.normalize(units[best == c].sum(0), dim=0))
    assert (units @ fit.T).amax(-1).sum() > (units @ start.T).amax(-1).sum()


def test_fitted_sub_keys_send_two_domains_to_fewer_shared_rows() -> None:
    """``fit_sub_keys`` on hashed memories beside GPT-2's MLPs: the share of the new domain's
    reads that land on rows a kept domain's sample also reads falls below random sub-keys'."""
    from fractalmoe.data import ByteDataset
    from fractalmoe.sparse_rows import add_hashed_memories, choice_counts, fit_sub_keys

    kept = ByteDataset.from_bytes(b"To be, or not to be: that is the question. " * 60, 0.1, 16)
    new = ByteDataset.from_bytes(bytes(range(32, 127)) * 40, 0.1, 16)

    def shared_share(fit: bool) -> float:
        torch.manual_seed(0)
        model = _gpt2()
        memories = add_hashed_memories(model, num_experts=65536, heads=1, topk=4, key_dim=16)
        if fit:
            fit_sub_keys(model, memories, [new, kept], seq_len=16, batch_size=8, seed=1)
        shares = []
        for (k, _), (n, _) in zip(choice_counts(model, memories, kept, 16, 8, 1),
                                  choice_counts(model, memories, new, 16, 8, 1)):
            shares.append(float(n[k > 0].sum() / n.sum()))
        return sum(shares) / len(shares)

    random_keys, fitted = shared_share(False), shared_share(True)
    assert fitted < 0.8 * random_keys, (fitted, random_keys)


@pytest.mark.parametrize("embeddings", [False, True], ids=["", "embeddings"])
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_gates_on_every_update_reach_from_the_base_to_the_ungated_model(build, embeddings: bool) -> None:
    """``gate_adapters`` on FHME adapters (beside the MLP and at the attention input), LoRA and a
    change to the embeddings: each site gets a gate of its own, LoRA inside a ``GatedLoRA`` that
    without a gate computes what peft's layer does; a prior far below the evidence shuts every
    gate (the base model's logits), one far above opens them all (the ungated model's)."""
    from fractalmoe.adapters import AdaptedFFN, GatedEmbedding, GatedHead, GatedLoRA
    from fractalmoe.data import ByteDataset
    from fractalmoe.sparse_rows import DomainGate, gate_adapters, set_gate_prior

    torch.manual_seed(0)
    model = build()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        base = model(idx).logits
    if embeddings and build is _llama:  # its head is a weight of its own: no change to share with the input
        with pytest.raises(ValueError, match="output head tied"):
            add_fhme_adapters(model, **ADAPTER, embeddings=True)
        return
    add_fhme_adapters(model, **ADAPTER, attention=dict(num_experts=64, topk=2), attention_lora=4,
                      embeddings=embeddings)
    _train(model, lambda m, x: m(x).logits, steps=3)
    model.eval()
    with torch.no_grad():
        ungated = model(idx).logits
    kept = ByteDataset.from_bytes(b"To be, or not to be: that is the question. " * 40, 0.1, 16)
    new = ByteDataset.from_bytes(bytes(range(32, 127)) * 30, 0.1, 16)
    layers = decoder_layers(model)
    placed = gate_adapters(model, new, [kept], 16, 4, 1)
    wrapped = [m for m in model.modules() if isinstance(m, GatedLoRA)]
    assert placed == 2 * len(layers) + len(wrapped) + 2 * embeddings and len(wrapped) >= 2 * len(layers)
    sites = [m for m in model.modules()
             if isinstance(m, (AdaptedFFN, AdaptedAttention, GatedLoRA, GatedEmbedding, GatedHead))]
    assert len(sites) == placed
    assert all(isinstance(m.domain_gate, DomainGate) for m in sites)
    gates = [m.domain_gate for m in sites]
    for m in sites:
        m.domain_gate = None
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, ungated, rtol=0, atol=1e-6)  # the wrappers alone
    for m, g in zip(sites, gates):
        m.domain_gate = g
    for prior, want in ((-1e4, base), (1e4, ungated)):
        set_gate_prior(model, prior)
        with torch.no_grad():
            torch.testing.assert_close(model(idx).logits, want, rtol=0, atol=1e-5)


def test_lora_on_flattened_tokens_cannot_be_gated() -> None:
    """LoRA on an FHME layer's router queries sees tokens without their sequence, which a domain
    gate needs: refused with a one-line reason."""
    from fractalmoe.adapters import add_lora_adapters
    from fractalmoe.data import ByteDataset
    from fractalmoe.sparse_rows import gate_adapters

    model = FHMELanguageModel(tiny_model_config())
    add_lora_adapters(model, rank=4, targets="all")
    data = ByteDataset.from_bytes(b"abc " * 200, 0.1, 16)
    with pytest.raises(ValueError, match="flattened tokens"):
        gate_adapters(model, data, [data], 16, 4, 1)


def test_a_change_to_the_embeddings_starts_at_zero_is_tied_and_counted() -> None:
    """``add_fhme_adapters(..., embeddings=True)`` on a FractalMoE model: the model starts exactly
    as the base, one (V, D) change is trained on both sides and stays one parameter through a move
    and a reload, and the FLOPs grow by the change's own head matmul (2 D V + V) and its gather (D)
    beside the adapters' own."""
    from fractalmoe.adapters import GatedEmbedding, GatedHead

    torch.manual_seed(0)
    model = FHMELanguageModel(tiny_model_config()).eval()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        base = model(idx)
    untouched = copy.deepcopy(model)
    without = FHMELanguageModel(tiny_model_config())
    add_fhme_adapters(without, **ADAPTER)
    add_fhme_adapters(model, **ADAPTER, embeddings=True)
    assert isinstance(model.embed, GatedEmbedding) and isinstance(model.head, GatedHead)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), base, rtol=0, atol=0)
    v, d = model.embed.delta.shape
    assert trainable_parameter_count(model) == trainable_parameter_count(without) + v * d
    assert model.flops_per_token() - without.flops_per_token() == 2 * d * v + v + d
    _train(model, lambda m, x: m(x), steps=2)
    model.to(torch.float64).to(torch.float32)
    assert model.head.delta is model.embed.delta and model.embed.delta.abs().sum() > 0
    assert model.head.base.weight is model.embed.base.weight and not model.embed.base.weight.requires_grad
    state = {k: v for k, v in model.state_dict().items() if k == "embed.delta" or "adapter" in k}
    again = copy.deepcopy(untouched)
    add_fhme_adapters(again, **ADAPTER, embeddings=True)
    again.load_state_dict(state, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(idx), model.eval()(idx), rtol=0, atol=1e-6)
