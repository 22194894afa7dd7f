"""This working tree's training step against an earlier revision's, on the same machine in one run:
one routed layer at a million experts (width 256, 8 heads x top-16, 2,048 tokens, as ``fractalmoe
bench layer`` times it) with row-wise Adagrad (deferred table gradients) and with lazy Adam, and
the default model's step (16 x 128 bytes, as ``fractalmoe bench model`` times it), in processes
started as ``fractalmoe bench`` starts them (every core, transparent huge pages).

The revision's ``src/`` is extracted with ``git archive`` and imported in its children instead of
the working tree's. Each (code, repeat) runs in a fresh process, alternated A/B/A/B; medians are
reported, and the run refuses to start while another PyTorch process runs or the load average is
above 0.5.

    REV=7cb1795 python benchmarks/revision_speed.py [--repeats 3] [--out FILE]

``LAYER=0`` leaves the layer out; ``LAYER_EXPERTS=16384,1048576`` times the layer at each N (default
1,048,576) and ``KEY_PARTS=4`` with product keys of 4 parts (default 2); ``LAYER_IMPLS`` picks the
impls (comma-separated); ``MODEL=0`` leaves the model out; ``MODEL_SET="k=v ..."`` changes the
model as ``--set`` does (e.g. ``MODEL_SET="ffn=moe ffn_hidden=78"``: the comparison's MoE).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

MODES = ("rev", "tree")
LAYER_IMPLS = "fractalmoe-deferred,fractalmoe-lazy-adam"
LAYER_EXPERTS = "1048576"


def measure(mode: str) -> dict[str, object]:
    """One process: the layer's fwd / bwd / opt per impl and the default model's step, with the
    code of ``mode``."""
    import fractalmoe
    from fractalmoe.bench import ModelSpec, run_model
    from fractalmoe.bench_layer import LayerSpec, run_layer
    from fractalmoe.config import default_run_config
    from fractalmoe.host_memory import keep_freed_memory
    from fractalmoe.roofline import Hardware

    out: dict[str, object] = {"mode": mode, "code": os.path.dirname(fractalmoe.__file__)}
    impls = os.environ.get("LAYER_IMPLS", LAYER_IMPLS).split(",") if os.environ.get("LAYER", "1") != "0" else []
    experts = [int(n) for n in os.environ.get("LAYER_EXPERTS", LAYER_EXPERTS).split(",")]
    parts = int(os.environ.get("KEY_PARTS", "2"))
    for impl in impls:
        for n in experts:  # any Hardware: no floor here
            row = run_layer(LayerSpec(impl=impl, num_experts=n, key_parts=parts), Hardware(1.0, 1.0, 1.0))
            tag = impl if n == 1_048_576 else f"{impl}_{n}"  # 1M keys as in earlier result files
            for phase in ("fwd", "bwd", "opt", "step"):
                out[f"{tag}_{phase}_ms"] = row[f"{phase}_ms"]
    if os.environ.get("MODEL", "1") == "0":
        return out
    keep_freed_memory()  # as bench model's processes (bench layer's do not)
    run = default_run_config()
    out["model_step_ms"] = run_model(ModelSpec(run.model.num_experts, batch_size=run.train.batch_size,
                                               steps=5, overrides=os.environ.get("MODEL_SET", "").split()))["step_ms"]
    return out


def extract(rev: str) -> str:
    """The revision's src/ in a temporary directory (left for the children; removed at exit)."""
    root = tempfile.mkdtemp(prefix="fractalmoe-rev-")
    archive = subprocess.run(["git", "archive", rev, "src/fractalmoe"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", root], input=archive.stdout, check=True)
    return os.path.join(root, "src")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # one measurement; the revision's code is imported first
        if sys.argv[2] == "rev":
            sys.path.insert(0, os.environ["FRACTALMOE_REV_SRC"])
        print(json.dumps(measure(sys.argv[2])))
        raise SystemExit(0)
    import atexit
    import shutil

    from fractalmoe.bench_hygiene import mode_benchmark

    rev = os.environ.get("REV")
    if not rev:
        print("error: set REV to the revision to compare against, e.g. REV=HEAD~1", file=sys.stderr)
        raise SystemExit(2)
    src = extract(rev)
    atexit.register(shutil.rmtree, os.path.dirname(src), True)
    os.environ["FRACTALMOE_REV_SRC"] = src
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages, as bench's processes
    mode_benchmark(__file__, __doc__, MODES, measure, "benchmarks/results/revision_speed.jsonl",
                   one_thread=False)
