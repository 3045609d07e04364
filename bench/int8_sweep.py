"""Sweep ``quantize_dynamic`` options through the int8 quality gate on a bundle (figures for the docs).

    .venv/bin/python -m bench.int8_sweep --model bench/results/bundle
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.mixes import make_mix  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from motlens.bundle import Bundle
    from motlens.onnx_embedder import OnnxEmbedder
    from motlens.onnx_export import FP32_FILE, INT8_FILE, ONNX_DIR, int8_gate

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("bench/results/bundle"), help="bundle with onnx/model.onnx")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    bundle = Bundle.open(a.model)
    head, golden = bundle.head(), bundle.golden()
    heldout = make_mix("novel", seed=202).take(400)
    speed_texts = heldout[:256]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "embedder"
        shutil.copytree(bundle.embedder_dir, d)
        src = d / ONNX_DIR / FP32_FILE
        fp32 = OnnxEmbedder(d, threads=a.threads)
        matmuls = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "MatMul"]
        ffn = [n for n in matmuls if "/intermediate/" in n or ("/output/dense/" in n and "/attention/" not in n)]
        configs = {
            "per-tensor, all ops": {"per_channel": False},
            "per-channel, all ops": {"per_channel": True},
            "per-channel, MatMul only": {"per_channel": True, "op_types_to_quantize": ["MatMul"]},
            "per-channel, FFN MatMuls only": {"per_channel": True, "op_types_to_quantize": ["MatMul"],
                                              "nodes_to_quantize": ffn},
            "per-channel, reduced range": {"per_channel": True, "reduce_range": True,
                                           "op_types_to_quantize": ["MatMul"]},
        }  # fmt: skip

        def rate(emb: OnnxEmbedder) -> float:
            emb.encode(speed_texts[:32])
            t0 = time.perf_counter()
            emb.encode(speed_texts)
            return len(speed_texts) / (time.perf_counter() - t0)

        print(f"fp32: {rate(fp32):.0f} texts/s", flush=True)
        for name, kw in configs.items():
            quantize_dynamic(str(src), str(d / ONNX_DIR / INT8_FILE), weight_type=QuantType.QInt8, **kw)
            q = OnnxEmbedder(d, threads=a.threads, variant="int8")
            gate = int8_gate(fp32, q, head, golden.texts, heldout)
            print(f"{name}: {gate.detail}; {rate(q):.0f} texts/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
