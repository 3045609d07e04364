"""Run ``motlens`` under a sampling profiler of its Python threads (where a served request's CPU goes).

A daemon thread reads every thread's stack (``sys._current_frames``) each ``--interval-ms`` and counts,
per thread, the innermost frame (self) and every function on the stack (inclusive). The summary is
rewritten every 10 s and at exit, so a server that is killed keeps what was sampled. Sampling takes
the GIL for a moment each time: figures are shares of samples, not timings.

    python -m bench.stack_sampler --out stacks.txt [--interval-ms 5] -- serve --model ... --http-port ...
"""

from __future__ import annotations

import argparse
import atexit
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType

TOP = 30


def _where(frame: FrameType) -> str:
    code = frame.f_code
    parts = Path(code.co_filename).parts
    return f"{'/'.join(parts[-2:])}:{code.co_name}"


class Sampler:
    """Counts, per thread name, innermost frames and the functions on the stack."""

    def __init__(self, out: Path, interval_s: float) -> None:
        self.out, self.interval_s = out, interval_s
        self.samples: Counter[str] = Counter()
        self.self_: dict[str, Counter[str]] = {}
        self.inclusive: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()

    def sample(self) -> None:
        me = threading.get_ident()
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            name = names.get(ident, f"thread-{ident}")
            seen: set[str] = set()
            leaf = _where(frame)
            f: FrameType | None = frame
            while f is not None:
                seen.add(_where(f))
                f = f.f_back
            with self._lock:
                self.samples[name] += 1
                self.self_.setdefault(name, Counter())[leaf] += 1
                self.inclusive.setdefault(name, Counter()).update(seen)

    def run(self) -> None:
        last_dump = time.monotonic()
        while True:  # a daemon thread: it ends with the process
            time.sleep(self.interval_s)
            self.sample()
            if time.monotonic() - last_dump > 10:
                self.dump()
                last_dump = time.monotonic()

    def dump(self) -> None:
        with self._lock:
            lines = [f"interval {self.interval_s * 1000:.1f} ms; samples per thread: {dict(self.samples)}"]
            for name, n in self.samples.most_common():
                lines.append(f"\n== {name}: {n} samples")
                lines.append("-- self (innermost frame)")
                lines += [f"{c / n:6.1%}  {w}" for w, c in self.self_[name].most_common(TOP)]
                lines.append("-- inclusive (on the stack)")
                lines += [f"{c / n:6.1%}  {w}" for w, c in self.inclusive[name].most_common(TOP)]
        self.out.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        threading.Thread(target=self.run, name="stack-sampler", daemon=True).start()
        atexit.register(self.dump)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--interval-ms", type=float, default=5.0)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the `motlens` arguments")
    a = p.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    Sampler(a.out, a.interval_ms / 1000).start()
    from motlens.cli import main as motlens_main

    sys.argv = ["motlens", *argv]
    return motlens_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
