"""Where the GPU offline ceiling goes, and what motlens' own encode path gains over sentence-transformers.

Per batch size: tokenization, forward pass and copy-back timed separately (as sentence-transformers
does them: the transformers tokenizer, then the model, then ``.cpu()``); ``SentenceTransformer.encode``;
``TorchEmbedder.encode`` (``tokenizers`` on a worker thread pipelined with the forward pass, one copy
back per call) with ``TOKENIZERS_PARALLELISM`` false and true; and the micro-batcher's
``encode_bucketed`` over it with ``max_items`` = the batch size (one served batch, without HTTP).

    MOTLENS_EMBEDDER_DIR=.gpu/minilm-fp16 python -m bench.gpu_profile [--texts 8192]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from bench.mixes import make_mix
from motlens.embedder import TorchEmbedder, default_model_dir
from predictor.batcher import MicroBatcher


def rate(n: int, fn: Callable[..., object], *args: object) -> float:
    """Items per second of ``fn(*args)`` over ``n`` items, with the GPU (if any) drained before and after."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    sync()
    t0 = time.perf_counter()
    fn(*args)
    sync()
    return n / (time.perf_counter() - t0)


def profile(emb: TorchEmbedder, texts: list[str], bs: int) -> str:
    """One line of figures for batch size ``bs``."""
    model, tok, n = emb._model, emb._model.tokenizer, len(texts)
    t0 = time.perf_counter()
    batches = [tok(texts[i : i + bs], padding=True, truncation=True, max_length=emb.max_seq_length,
                   return_tensors="pt") for i in range(0, n, bs)]  # fmt: skip
    r_tok = n / (time.perf_counter() - t0)
    outs: list[torch.Tensor] = []

    def forward() -> None:
        with torch.inference_mode():
            for b in batches:
                outs.append(model({k: v.to(emb.device, non_blocking=True) for k, v in b.items()})["sentence_embedding"])

    r_fwd = rate(n, forward)
    r_cpy = rate(n, lambda: [o.float().cpu().numpy() for o in outs])
    r_st = rate(n, lambda: model.encode(texts, batch_size=bs, convert_to_numpy=True, normalize_embeddings=True,
                                         show_progress_bar=False))  # fmt: skip
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    r_new = {}
    for value in ("false", "true"):
        os.environ["TOKENIZERS_PARALLELISM"] = value  # tokenizers reads it on every encode_batch
        emb.encode(texts[: 2 * bs], batch_size=bs)
        r_new[value] = rate(n, emb.encode, texts, bs)
    if parallelism is None:
        os.environ.pop("TOKENIZERS_PARALLELISM")
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = parallelism
    batcher = MicroBatcher(emb.tokenize, emb.encode_tokens, max_items=bs, max_tokens=bs * 64)
    try:
        r_bat = rate(n, lambda: [batcher.encode_bucketed(texts[i : i + bs]) for i in range(0, n, bs)])
    finally:
        batcher.close()
    return (f"batch {bs}: tokenize {r_tok:,.0f}/s, forward {r_fwd:,.0f}/s, copy {r_cpy:,.0f}/s, "
            f"sentence-transformers encode {r_st:,.0f}/s, TorchEmbedder.encode {r_new['false']:,.0f}/s "
            f"(TOKENIZERS_PARALLELISM=true: {r_new['true']:,.0f}/s), batcher encode_bucketed "
            f"(max_items {bs}, max_tokens {bs * 64}) {r_bat:,.0f}/s")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--texts", type=int, default=8192)
    p.add_argument("--dtype", default="float16")
    a = p.parse_args()
    texts = make_mix("novel", seed=4242).take(a.texts)
    emb = TorchEmbedder(default_model_dir(), device="cuda", dtype=a.dtype)
    print(f"torch threads {torch.get_num_threads()}, TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM')}, CPUs {os.cpu_count()}")  # fmt: skip
    lengths = [len(ids) for ids in emb.tokenize(texts)]
    print(f"tokens per text: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}")
    emb.encode(texts[:1024], batch_size=256)
    emb._model.encode(texts[:1024], batch_size=256, show_progress_bar=False)
    for bs in (128, 512, 2048):
        print(profile(emb, texts, bs), flush=True)


if __name__ == "__main__":
    main()
