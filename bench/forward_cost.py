"""What one forward of the sampling model costs, by rows and width: the numbers behind the HF
engine's cohort rule (`HFEngine.cohort_cost`) and behind README "What a reset method costs"
(a reset step's extra model calls and localization prefills).

  decode   one token per row on a KV cache of W positions (B rows): fixed + per row + per position
  prefill  B contexts of W tokens: per token

Medians of `--repeats` forwards; the fit of the decode costs (least squares over the grid) and the
ratio of a prefilled token to a decoded one are measured in the same run (this machine is shared
and its speed drifts: compare only what one run prints).

    python bench/forward_cost.py [--config tiny] [--rows 1 8 32 128 256] [--widths 32 96 192] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 96, 192])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from srpo_core.config import load_config
    from srpo_core.engine.hf import _cache_of
    from srpo_core.loop import open_session

    torch.set_num_threads(args.threads)
    session = open_session(load_config(args.config, {}))
    engine = session.engine
    model, vocab = engine.model, engine.model.config.vocab_size

    @torch.no_grad()
    def decode(rows: int, width: int) -> float:
        ids = torch.randint(0, vocab, (rows, width), device=engine.device)
        cache = _cache_of(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1))
        tok = torch.randint(0, vocab, (rows, 1), device=engine.device)
        attn = torch.ones((rows, width + 1), dtype=torch.long, device=engine.device)
        pos = torch.full((rows, 1), width, device=engine.device)

        def one():
            model(input_ids=tok, attention_mask=attn, position_ids=pos, use_cache=True, **{engine._cache_kw: cache})
            for layer in cache.layers:  # back to `width` positions: every repeat decodes on the same cache
                layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]

        return median_ms(one, args.repeats)

    @torch.no_grad()
    def prefill(rows: int, width: int) -> float:
        ids = torch.randint(0, vocab, (rows, width), device=engine.device)
        return median_ms(lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1), max(3, args.repeats // 3))

    print(f"{args.config}: {type(model).__name__}, hidden {model.config.hidden_size}, layers {model.config.num_hidden_layers}, vocab {vocab}, {args.threads} thread(s), medians of {args.repeats}")
    grid = [(b, w, decode(b, w)) for b in args.rows for w in args.widths]
    print("decode ms per forward   " + "  ".join(f"W={w:>4d}" for w in args.widths))
    for b in args.rows:
        print(f"  B={b:>4d}               " + "  ".join(f"{ms:6.2f}" for bb, _, ms in grid if bb == b))
    # ms = fixed + per_row * B + per_position * B * W, least squares
    x = torch.tensor([[1.0, b, b * w] for b, w, _ in grid], dtype=torch.float64)
    y = torch.tensor([ms for _, _, ms in grid], dtype=torch.float64)
    fixed, per_row, per_pos = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
    print(f"  fit: {fixed:.2f} ms fixed + {per_row * 1e3:.1f} us per row + {per_pos * 1e3:.2f} us per cached position "
          f"(one more forward = {fixed / max(per_pos, 1e-9):.0f} row-positions; HFEngine.cohort_cost is {engine.cohort_cost})")
    small = [b for b in args.rows if b <= 32] or args.rows[:1]
    print("prefill us per token    " + "  ".join(f"W={w:>4d}" for w in args.widths))
    per_token = {}
    for b in small:
        per_token[b] = [prefill(b, w) * 1e3 / (b * w) for w in args.widths]
        print(f"  B={b:>4d}               " + "  ".join(f"{us:6.1f}" for us in per_token[b]))
    decoded = statistics.median(ms * 1e3 / b for b, _, ms in grid if b >= 32)
    prefilled = statistics.median(us for row in per_token.values() for us in row)
    print(f"a prefilled token costs {prefilled / decoded:.2f}x a decoded one (medians: {prefilled:.1f} us vs {decoded:.1f} us per row-step at B >= 32)")


if __name__ == "__main__":
    main()
