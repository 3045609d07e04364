"""Where the GPU offline ceiling goes: tokenization, forward pass and copy-back timed separately.

    MOTLENS_EMBEDDER_DIR=.gpu/minilm-fp16 python -m bench.gpu_profile [--texts 8192]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.mixes import make_mix
from motlens.embedder import TorchEmbedder, default_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--texts", type=int, default=8192)
    p.add_argument("--dtype", default="float16")
    a = p.parse_args()
    texts = make_mix("novel", seed=4242).take(a.texts)
    emb = TorchEmbedder(default_model_dir(), device="cuda", dtype=a.dtype)
    model, tok = emb._model, emb.tokenizer
    print(f"torch threads {torch.get_num_threads()}, TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}")
    lengths = emb.token_lengths(texts)
    print(f"tokens per text: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}")
    emb.encode(texts[:1024], batch_size=256)
    for bs in (128, 512, 2048):
        t0 = time.perf_counter()
        batches = [tok(texts[i : i + bs], padding=True, truncation=True, max_length=256, return_tensors="pt")
                   for i in range(0, len(texts), bs)]  # fmt: skip
        t_tok = time.perf_counter() - t0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = []
        with torch.inference_mode():
            for b in batches:
                out = model({k: v.to("cuda", non_blocking=True) for k, v in b.items()})
                outs.append(out["sentence_embedding"])
        torch.cuda.synchronize()
        t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        for o in outs:
            o.float().cpu().numpy()
        t_cpy = time.perf_counter() - t0
        t0 = time.perf_counter()
        emb.encode(texts, batch_size=bs)
        t_enc = time.perf_counter() - t0
        n = len(texts)
        print(f"batch {bs}: tokenize {n / t_tok:,.0f}/s, forward {n / t_fwd:,.0f}/s, copy {n / t_cpy:,.0f}/s, "
              f"sentence-transformers encode {n / t_enc:,.0f}/s")


if __name__ == "__main__":
    main()
