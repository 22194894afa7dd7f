"""CUDA paths: every FFN type trains, evaluates and generates on the GPU, and nothing it creates
(parameters, buffers, gradients, optimizer state, outputs) lands anywhere else.

Skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them (``pytest -m cuda``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from placement import off_device

from fractalmoe.checkpoint import latest_checkpoint, load_model_from_run
from fractalmoe.config import RunConfig, TrainConfig, tiny_model_config
from fractalmoe.data import ByteDataset
from fractalmoe.evaluate import evaluate
from fractalmoe.model import FHMELanguageModel
from fractalmoe.optim import ModelOptimizer
from fractalmoe.train import cuda_sync_debug, run, train_step

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FFNS = ["fhme", "dense", "moe", "pkm", "peer", "memplus"]
CORPUS = "Once more unto the breach, dear friends, once more; or close the wall up.\n" * 60


def _config(ffn: str, **extra) -> object:
    return tiny_model_config(ffn=ffn, **extra)


def _off_device(model: torch.nn.Module, opt: ModelOptimizer | None = None) -> list[str]:
    """Names of every parameter, gradient, buffer or optimizer state tensor not on CUDA."""
    return off_device(model, opt.optimizers if opt is not None else [], "cuda", scalar_state=False)


@pytest.fixture
def corpus(tmp_path: Path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return str(path)


@pytest.mark.parametrize("ffn", FFNS)
@pytest.mark.parametrize("expert_optim", ["rowwise_adagrad", "lazy_adam", "rowwise_adagrad+deferred"])
def test_train_steps_stay_on_cuda(ffn: str, expert_optim: str) -> None:
    model = FHMELanguageModel(_config(ffn)).cuda().train()
    rule, _, deferred = expert_optim.partition("+")
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, rule, deferred_table_grads=bool(deferred))
    x = torch.randint(0, 256, (4, 32), device="cuda")
    losses = []
    for _ in range(3):
        loss, ok = train_step(model, opt, x, x.roll(-1, 1), 1.0)
        assert ok
        losses.append(loss)
    assert losses[-1] < losses[0]
    assert not _off_device(model, opt)
    assert model(x).is_cuda


@pytest.mark.parametrize("ffn", FFNS)
def test_eval_and_generate_on_cuda(ffn: str, corpus: str) -> None:
    cfg = _config(ffn)
    model = FHMELanguageModel(cfg).cuda()
    data = ByteDataset.load(corpus, 0.2, cfg.seq_len)
    result = evaluate(model, data, 4, 8, device="cuda")
    assert result.val_loss > 0 and result.tokens > 0
    gen = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, 256, (2, 5), device="cuda")
    out = model.generate(prompt, 2 * cfg.seq_len, temperature=0.8, top_k=20, generator=gen)
    assert out.is_cuda and out.shape == (2, 5 + 2 * cfg.seq_len)
    model.eval()
    greedy = model.generate(prompt, 16, temperature=0.0)
    ref = prompt  # full recompute at every step, no cache (as tests/test_model.py does on the CPU)
    with torch.no_grad():
        for _ in range(16):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, ref)
    assert not _off_device(model)


@pytest.mark.parametrize("deferred", [False, True])
def test_fused_lazy_adam_equals_the_eager_one_on_cuda(deferred: bool) -> None:
    """The one-kernel row update (Triton here) trains as the eager passes do, on the device."""
    models, opts = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        models.append(FHMELanguageModel(_config("fhme")).cuda().train())
        opts.append(ModelOptimizer(models[-1], 1e-3, 0.03, 0.0, "lazy_adam", deferred_table_grads=deferred,
                                   fused_row_update=fused))
    x = torch.randint(0, 256, (4, 32), device="cuda")
    for _ in range(3):
        for model, opt in zip(models, opts):
            assert train_step(model, opt, x, x.roll(-1, 1), 1.0)[1]
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=name)
    assert not _off_device(models[1], opts[1])


@pytest.mark.parametrize("rule", ["rowwise_adagrad", "lazy_adam"])
def test_bfloat16_tables_with_stochastic_rounding_train_on_cuda(rule: str) -> None:
    model = FHMELanguageModel(_config("fhme", expert_dtype="bfloat16")).cuda().train()
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, rule, stochastic_rounding=True)
    x = torch.randint(0, 256, (4, 32), device="cuda")
    losses = [train_step(model, opt, x, x.roll(-1, 1), 1.0) for _ in range(3)]
    assert all(ok for _, ok in losses) and losses[-1][0] < losses[0][0]
    assert not _off_device(model, opt)


@pytest.mark.parametrize("ffn", ["fhme", "pkm"])
def test_float16_tables_train_on_cuda(ffn: str) -> None:
    from fractalmoe.optim import defers_table_grads

    model = FHMELanguageModel(_config(ffn, expert_dtype="float16")).cuda().train()
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, "lazy_adam",
                         deferred_table_grads=defers_table_grads(model, False, "lazy_adam"))
    x = torch.randint(0, 256, (4, 32), device="cuda")
    losses = [train_step(model, opt, x, x.roll(-1, 1), 1.0) for _ in range(3)]
    assert all(ok for _, ok in losses) and losses[-1][0] < losses[0][0]
    assert not _off_device(model, opt)


def test_route_once_trains_on_cuda() -> None:
    model = FHMELanguageModel(_config("fhme", fractal_depth=3, route_once=True)).cuda().train()
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0)
    x = torch.randint(0, 256, (4, 32), device="cuda")
    assert all(train_step(model, opt, x, x.roll(-1, 1), 1.0)[1] for _ in range(2))
    assert not _off_device(model, opt)


def test_per_step_row_selection_on_cuda() -> None:
    from fractalmoe import FHME
    from fractalmoe.sparse_rows import StepRowSelector

    layer = FHME(16, 256, depth=2, heads=2, topk=4, key_dim=8, block="value").cuda().train()
    kept_windows = torch.zeros(256, dtype=torch.long)  # on the host: the selector moves it
    selector = StepRowSelector(layer, kept_windows, 10, top=6)
    layer(torch.randn(24, 16, device="cuda")).square().sum().backward()
    grad = layer.fractal.bank.values.grad.coalesce()
    assert selector.keep.is_cuda and grad.is_cuda and int(selector.keep.sum()) == 6
    moved = grad.indices()[0][grad.values().abs().sum(-1) > 0]
    assert bool(selector.keep[moved].all())


def test_adaptive_depth_compaction_on_cuda() -> None:
    model = FHMELanguageModel(_config("fhme", fractal_depth=3, adaptive_depth=True)).cuda().eval()
    x = torch.randint(0, 256, (2, 32), device="cuda")
    layers = model.fhme_layers()
    for layer in layers:  # tokens spread over the depths (at init every token runs full depth)
        torch.nn.init.normal_(layer.depth_router.weight, std=2.0)
    depths: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(
        lambda mod, inp, out: depths.append(mod.choose_depth(inp[0].reshape(-1, mod.dim))[0]))
        for layer in layers]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    assert len(depths) == len(layers)
    assert all(len(set(d.tolist())) > 1 for d in depths)  # compaction has stages to skip
    with torch.no_grad():
        compact = model(x)
        for layer in layers:
            layer.compact = False
        masked = model(x)
    torch.testing.assert_close(compact, masked, rtol=1e-4, atol=1e-5)


def test_run_checkpoints_on_cuda_and_loads_on_cpu(tmp_path: Path, corpus: str) -> None:
    cfg = RunConfig(_config("fhme"), TrainConfig(batch_size=4, max_steps=4, eval_every=2,
                                                 save_every=2, sample_bytes=16, warmup_steps=1))
    result = run(cfg, out=tmp_path / "r", data_path=corpus, device="cuda", progress=False,
                 log=lambda s: None)
    assert result.step == 4 and result.val_loss is not None and 0 < len(result.sample) <= 16  # bytes decoded
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("val_loss") is not None for m in lines)
    resumed = run(RunConfig(cfg.model, cfg.train.replace(max_steps=6)), resume=tmp_path / "r",
                  device="cuda", progress=False, log=lambda s: None)
    assert resumed.step == 6
    cpu_model, _, _ = load_model_from_run(tmp_path / "r", "cpu")
    gpu_model, _, _ = load_model_from_run(tmp_path / "r", "cuda")
    assert latest_checkpoint(tmp_path / "r").name == "step_000006"
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(gpu_model(x.cuda()).cpu(), cpu_model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rule", ["lazy_adam", "rowwise_adagrad"])
def test_the_first_step_after_a_resume_does_not_sync(rule: str) -> None:
    """Optimizer state read from a file (on the CPU) is placed beside its tables when loaded,
    not copied to the device inside the next step."""
    import io

    model = FHMELanguageModel(_config("fhme")).cuda().train()
    x = torch.randint(0, 256, (4, 32), device="cuda")
    opt = ModelOptimizer(model, 1e-3, 0.05, 0.0, rule)
    train_step(model, opt, x, x.roll(-1, 1), 1.0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = ModelOptimizer(model, 1e-3, 0.05, 0.0, rule)
    resumed.load_state_dict(torch.load(buf, map_location="cpu", weights_only=False))
    assert not _off_device(model, resumed)
    with cuda_sync_debug("error", "cuda"):
        _, ok = train_step(model, resumed, x, x.roll(-1, 1), 1.0)
    assert ok


@pytest.mark.parametrize("ffn", FFNS)
def test_a_model_built_in_a_cuda_block_lives_on_cuda(ffn: str) -> None:
    with torch.device("cuda"):
        model = FHMELanguageModel(_config(ffn))
    assert _off_device(model) == []


@pytest.mark.parametrize("impl", ["fractalmoe", "fractalmoe-lazy-adam-fused", "peer-dense"])
def test_bench_layer_times_on_cuda(impl: str) -> None:
    from fractalmoe.bench_layer import LayerSpec, build_impl, run_layer
    from fractalmoe.roofline import Hardware, copy_gbps, gather_gbps, matmul_gflops

    spec = LayerSpec(impl, num_experts=64, dim=16, heads=2, topk=4, key_dim=8, tokens=16, steps=2,
                     device="cuda")
    assert all(t.is_cuda for t in build_impl(spec).tables)
    row = run_layer(spec, Hardware(matmul_gflops(256, 2, "cuda"), gather_gbps(16, table_mb=8, device="cuda"),
                                   copy_gbps(8, device="cuda")))
    assert row["peak_device_gb"] > 0 and row["touched_rows"] > 0 and row["step_ms"] > 0


def test_benchmarks_refuse_a_cuda_device_this_machine_lacks() -> None:
    from fractalmoe.bench import check_device

    check_device("cuda:0")
    with pytest.raises(ValueError, match="CUDA device"):
        check_device(f"cuda:{torch.cuda.device_count()}")


def test_bench_model_times_on_cuda() -> None:
    from fractalmoe.bench import ModelSpec, run_model

    row = run_model(ModelSpec(4096, batch_size=2, steps=1, device="cuda"))
    assert row["peak_device_gb"] > 0 and row["step_ms"] > 0


def test_sync_debug_context_restores_the_mode() -> None:
    before = torch.cuda.get_sync_debug_mode()
    with cuda_sync_debug("warn", "cuda"):
        assert torch.cuda.get_sync_debug_mode() == 1
    assert torch.cuda.get_sync_debug_mode() == before
    with cuda_sync_debug("error", "cpu"):  # CPU runs are never affected
        assert torch.cuda.get_sync_debug_mode() == before


@pytest.mark.parametrize("ffn", FFNS)
def test_bfloat16_autocast_steps_train_on_cuda_without_a_host_sync(ffn: str) -> None:
    """As GPU training loops run: forward under bfloat16 autocast, tables and state float32."""
    model = FHMELanguageModel(_config(ffn)).cuda().train()
    opt = ModelOptimizer(model, 1e-3, 0.03, 0.0, "lazy_adam")
    x = torch.randint(0, 256, (4, 32), device="cuda")
    first, ok = train_step(model, opt, x, x.roll(-1, 1), 1.0, autocast=torch.bfloat16)
    assert ok
    with cuda_sync_debug("error", "cuda"):
        last, ok = train_step(model, opt, x, x.roll(-1, 1), 1.0, autocast=torch.bfloat16)
    assert ok and last < first
    assert not _off_device(model, opt)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_model_materialised_from_meta_on_cuda_initialises_there_and_trains() -> None:
    with torch.device("meta"):
        model = FHMELanguageModel(_config("fhme"))
    model.to_empty(device="cuda")
    model.init_weights()
    assert not _off_device(model) and model.head.weight is model.embed.weight
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    opt = ModelOptimizer(model.train(), 1e-3, 0.03, 0.0, "lazy_adam")
    x = torch.randint(0, 256, (4, 32), device="cuda")
    losses = [train_step(model, opt, x, x.roll(-1, 1), 1.0) for _ in range(3)]
    assert all(ok for _, ok in losses) and losses[-1][0] < losses[0][0]


def test_activation_checkpointing_trains_on_cuda_without_a_host_sync() -> None:
    model = FHMELanguageModel(_config("fhme")).cuda().train()
    model.checkpoint_blocks = True
    opt = ModelOptimizer(model, 1e-3, 0.03, 0.0, "lazy_adam")
    x = torch.randint(0, 256, (4, 32), device="cuda")
    first, ok = train_step(model, opt, x, x.roll(-1, 1), 1.0, autocast=torch.bfloat16)
    with cuda_sync_debug("error", "cuda"):
        last, ok = train_step(model, opt, x, x.roll(-1, 1), 1.0, autocast=torch.bfloat16)
    assert ok and last < first and not _off_device(model, opt)
