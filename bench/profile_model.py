"""Where a generator's CPU inference time goes (not a test): ONNX Runtime's own per-node profile.

Runs the model on random one-hot mask windows (a warm-up, then `--runs` timed batches) with ONNX Runtime's
profiler on, and prints the share of kernel time per node, largest first. For SAFRON generators the 41x41
context convolution (fused with its LeakyReLU by ONNX Runtime, hence the node's name) dominates: 256 x 256
outputs x 1681 multiply-adds per input/output channel pair, where each 4x4 stride-2 layer after it does 16 per
pair on a map a quarter the size of its input.

    python bench/profile_model.py                       # the embedded default model, 1 thread, batch 8
    python bench/profile_model.py --model generator.onnx --threads 2 --batch 16
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="ONNX model (default: the embedded default model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--top", type=int, default=8, help="nodes listed")
    args = parser.parse_args()

    import onnxruntime as ort

    from safron import engine
    from safron.export import random_masks

    model = args.model or engine.default_model_path()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "safron_profile")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    window = session.get_inputs()[0].shape[2]
    masks = random_masks(args.batch, window, seed=0)
    session.run(None, {"mask": masks})  # warm-up: allocations, kernel selection
    start = time.perf_counter()
    for _ in range(args.runs):
        session.run(None, {"mask": masks})
    seconds = (time.perf_counter() - start) / args.runs
    trace = Path(session.end_profiling())

    per_node: collections.Counter[tuple[str, str]] = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[(event["args"].get("op_name", "?"), event["name"].removesuffix("_kernel_time"))] += event["dur"]
    trace.unlink()
    total = sum(per_node.values())
    print(f"{model.name}: batch {args.batch}, {args.threads} thread(s), {seconds:.3f} s per batch "
          f"({seconds / args.batch * 1000:.0f} ms per patch); share of kernel time per node:")
    for (op, node), microseconds in per_node.most_common(args.top):
        print(f"  {microseconds / total:6.1%}  {op:<14} {node}")


if __name__ == "__main__":
    main()
