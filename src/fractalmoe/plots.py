"""PNG plots of a run: loss curves, expert-usage histograms, per-byte depth maps."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .checkpoint import CheckpointError, load_model_from_run, load_run_data  # noqa: E402
from .data import ByteDataset, encode  # noqa: E402
from .evaluate import ChoiceCounts, UsageStats, choice_sources  # noqa: E402
from .model import FHMELanguageModel  # noqa: E402
from .stats import collect  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} has no metrics.jsonl; is it a FractalMoE run directory?")
    lines = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:  # a line cut short by a kill: skip it
            if n != len(path.read_text().splitlines()):
                raise CheckpointError(f"{path}:{n} is not valid JSON") from None
    return lines


def plot_losses(metrics: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(m["step"], m["train_loss"]) for m in metrics if m.get("train_loss") is not None]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_usage(model: FHMELanguageModel, data: ByteDataset, batch_size: int, out: Path) -> Path | None:
    """Histogram of selections per expert (log scale), one series per layer and block."""
    counts = _usage_counts(model, data, batch_size)
    if not counts:
        return None
    stats = [UsageStats.from_counts(c) for _, c in counts]
    used = sum(s.fraction_used for s in stats) / len(stats)
    kl = sum(s.kl_uniform for s in stats) / len(stats)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, c in counts:
        ax.hist(c.numpy(), bins=50, histtype="step", label=label, log=True)
    ax.set_xlabel("selections per expert over validation windows")
    ax.set_ylabel("experts")
    ax.set_title(f"experts used {used:.1%}, KL(usage||uniform) {kl:.3f} nats (mean over blocks)")
    if len(counts) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "expert_usage.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def _usage_counts(model: FHMELanguageModel, data: ByteDataset, batch_size: int) -> list[tuple[str, torch.Tensor]]:
    model.eval()
    routed = choice_sources(model)
    counts = ChoiceCounts([m for _, sources in routed for m in sources])
    for x, _ in data.val_batches(batch_size, model.cfg.seq_len, 64 * batch_size):
        with collect(model) as stats:
            model(x)
        counts.add(stats)
    chosen = counts.host()
    return [(f"layer {i} block {j + 1}", chosen[m]) for i, sources in routed for j, m in enumerate(sources)]


@torch.no_grad()
def token_depths(model: FHMELanguageModel, text: str) -> torch.Tensor:
    """Mean chosen depth over FHME layers for each byte of text: (T,), read in consecutive
    windows of the model's context."""
    model.eval()
    depths: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(
        lambda mod, inp, out: depths.append(mod.choose_depth(inp[0].reshape(-1, mod.dim))[0].float()))
        for layer in model.fhme_layers()]
    per_window = []
    for window in encode(text).split(model.cfg.seq_len):
        depths.clear()
        model(window.unsqueeze(0))
        if depths:
            per_window.append(torch.stack(depths).mean(0))
    for h in hooks:
        h.remove()
    if not per_window:
        raise ValueError("this model has no FHME layers: nothing to map")
    return torch.cat(per_window)


def byte_labels(text: str) -> list[str]:
    """One label per UTF-8 byte of text: a character on its first byte, "" on the rest, so that
    label i belongs to byte i (the model's position i) even where characters take several bytes."""
    return [label for ch in text for label in (ch, *[""] * (len(ch.encode("utf-8")) - 1))]


def plot_depth_map(model: FHMELanguageModel, text: str, out: Path) -> Path:
    """Each byte of text drawn in a cell coloured by its mean depth over layers."""
    depth = token_depths(model, text)
    max_depth = max(layer.depth for layer in model.fhme_layers())
    cols = 64
    rows = (depth.numel() + cols - 1) // cols
    fig, ax = plt.subplots(figsize=(cols * 0.16, rows * 0.3 + 0.8))
    cmap = plt.get_cmap("viridis")
    for i, ch in enumerate(byte_labels(text)):
        r, c = divmod(i, cols)
        level = (float(depth[i]) - 1) / max(max_depth - 1, 1)
        ax.add_patch(plt.Rectangle((c, -r - 1), 1, 1, color=cmap(level)))
        ax.text(c + 0.5, -r - 0.5, "\u23ce" if ch == "\n" else ch, ha="center", va="center",
                fontsize=7, color="white" if level < 0.6 else "black", family="monospace")
    ax.set_xlim(0, cols)
    ax.set_ylim(-rows, 0)
    ax.axis("off")
    ax.set_title(f"per-byte depth (dark = 1, bright = {max_depth}); mean {float(depth.mean()):.2f}")
    fig.tight_layout()
    path = out / "depth_map.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


BYTE_CLASSES = ("letter", "start of word", "space", "newline", "punctuation", "digit", "other")


def byte_classes(data: bytes) -> list[set[str]]:
    """The classes of each byte; "start of word" is a letter after a non-letter (it is also a
    letter)."""
    out = []
    for i, b in enumerate(data):
        ch = chr(b)
        if ch.isalpha() and b < 128:
            names = {"letter"} | ({"start of word"} if i == 0 or not chr(data[i - 1]).isalpha() else set())
        elif ch == "\n":
            names = {"newline"}
        elif ch == " ":
            names = {"space"}
        elif ch.isdigit():
            names = {"digit"}
        elif 33 <= b < 127:
            names = {"punctuation"}
        else:
            names = {"other"}
        out.append(names)
    return out


def depth_by_byte_class(model: FHMELanguageModel, text: str) -> str:
    """A Markdown table of the mean chosen depth (over FHME layers) per byte class of text: where
    the compute goes."""
    data = text.encode("utf-8")
    depth = token_depths(model, text)
    classes = byte_classes(data[: depth.numel()])
    lines = ["| bytes | count | mean depth |", "|---|---:|---:|"]
    for name in ("all", *BYTE_CLASSES):
        picked = [float(depth[i]) for i, names in enumerate(classes) if name == "all" or name in names]
        if picked:
            lines.append(f"| {name} | {len(picked)} | {sum(picked) / len(picked):.2f} |")
    return "\n".join(lines) + "\n"


def plot_run(run_dir: Path, out: Path | None = None, depth_text: str | None = None) -> list[Path]:
    """Write the run's plots; returns their paths."""
    if depth_text == "":
        raise ValueError("--depth-map needs --text with at least one character")
    metrics = read_metrics(run_dir)
    out = out or run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_losses(metrics, out)]
    model, config, _ = load_model_from_run(run_dir)
    data = load_run_data(run_dir, config)
    usage = plot_usage(model, data, config.train.batch_size, out)
    if usage is not None:
        paths.append(usage)
    if depth_text is not None:
        paths.append(plot_depth_map(model, depth_text, out))
        table = out / "depth_by_byte_class.md"
        table.write_text(depth_by_byte_class(model, depth_text))
        paths.append(table)
    return paths


def plot_frontier(rows: list[dict], out: Path) -> Path:
    """bpb vs blocks/token: every run's fixed depths (a line per run), the fixed-depth frontier
    and the adaptive models (``bench adaptive`` rows over several runs)."""
    from .bench import rows_frontier

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in dict.fromkeys(r["run"] for r in rows):
        fixed = [r for r in rows if r["run"] == run and r["mode"] != "adaptive"]
        ax.plot([r["blocks_per_token"] for r in fixed], [r["val_bpb"] for r in fixed], "o:", ms=3,
                alpha=0.6, label=f"{Path(run).name}, fixed depths")
        for r in rows:
            if r["run"] == run and r["mode"] == "adaptive":
                ax.plot(r["blocks_per_token"], r["val_bpb"], "*", ms=12, label=f"{Path(run).name}, adaptive")
    front = rows_frontier(rows)
    ax.plot([b for b, _ in front], [y for _, y in front], "k-", lw=1, label="fixed-depth frontier")
    ax.set_xlabel("routed blocks per token")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_comparison(rows: list[dict], out: Path) -> list[Path]:
    """Validation bpb vs training FLOPs and vs wall-clock for every compared run; for a sweep,
    final bpb vs the swept value."""
    paths = []
    fig_f, ax_f = plt.subplots(figsize=(7, 4))
    fig_t, ax_t = plt.subplots(figsize=(7, 4))
    for row in rows:
        cfg = row["config"]
        metrics = [m for m in read_metrics(Path(row["run_dir"])) if m.get("val_bpb") is not None]
        train_cfg = json.loads((Path(row["run_dir"]) / "config.json").read_text())["train"]
        tokens_per_step = train_cfg["batch_size"] * cfg["seq_len"]
        label = f"{row['model']} s{row['seed']}"
        flops = [3 * row["flops_per_token"] * tokens_per_step * m["step"] for m in metrics]
        ax_f.plot(flops, [m["val_bpb"] for m in metrics], "o-", ms=3, label=label)
        ax_t.plot([m["elapsed_s"] for m in metrics], [m["val_bpb"] for m in metrics], "o-", ms=3, label=label)
    for ax, fig, xlabel, name in ((ax_f, fig_f, "training FLOPs (3 x forward)", "bpb_vs_flops.png"),
                                  (ax_t, fig_t, "wall-clock seconds", "bpb_vs_time.png")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    swept = [r for r in rows if "=" in r["model"]]
    if swept:
        paths.append(plot_sweep(swept, out))
    return paths


def plot_sweep(swept: list[dict], out: Path) -> Path:
    """Final bpb vs the swept value ("MODEL KEY=VALUE" rows; mean and half-range over seeds): on
    a numeric axis when every value is a number, else one position per value in sweep order
    (gate=softmax,sigmoid; true/false fields)."""
    key = swept[0]["model"].split(" ")[1].split("=")[0]
    by_value: dict[str, list[float]] = {}
    for r in swept:
        by_value.setdefault(r["model"].split("=", 1)[1], []).append(r["val_bpb"])
    try:
        numbers = {v: float(v) for v in by_value}
    except ValueError:
        numbers = None
    values = sorted(by_value, key=numbers.__getitem__) if numbers else list(by_value)
    xs = [numbers[v] for v in values] if numbers else list(range(len(values)))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(xs, [sum(by_value[v]) / len(by_value[v]) for v in values],
                yerr=[(max(by_value[v]) - min(by_value[v])) / 2 for v in values], fmt="o-" if numbers else "o")
    if numbers is None:
        ax.set_xticks(xs, values)
    elif key == "num_experts":
        ax.set_xscale("log", base=2)
    ax.set_xlabel(key)
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"bpb_vs_{key}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
