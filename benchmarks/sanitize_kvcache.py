#!/usr/bin/env python3
"""A tiny flash_attn_with_kvcache workload for compute-sanitizer (memcheck, racecheck).

Dense and paged caches (page 16, pages shuffled), an append of new keys with rotary embeddings, GQA decode
(the packed query heads), s_q > 1 under causal and a window, split and unsplit key loops, cache_batch_idx
and cache_leftpad, and a cache_seqlens whose append would run past the capacity (those rows must be
dropped, never written out of bounds). Sizes end mid-tile. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1.
"""

import torch
from sanitize_common import import_flash_attn2

HEAD_DIM = 128
BATCH, NHEADS, NHEADS_K = 2, 8, 2
S_CACHE, PAGE = 200, 16


def main():
    flash_attn2 = import_flash_attn2()
    dtype = torch.bfloat16
    torch.manual_seed(0)
    for paged in (False, True):
        for seqlen_q, s_new, causal, window, splits, extras in (
            (1, 1, True, (-1, -1), 1, False),
            (1, 3, False, (-1, -1), 3, True),
            (5, 5, True, (40, 0), 3, True),
            (33, 0, True, (-1, -1), 0, False),
        ):
            if paged and extras:
                extras = False  # leftpad and batch_idx are dense-only
            pages_per_seq = (S_CACHE + PAGE - 1) // PAGE
            if paged:
                num_pages = BATCH * pages_per_seq + 3
                k_cache = torch.randn(num_pages, PAGE, NHEADS_K, HEAD_DIM, device="cuda", dtype=dtype)
                block_table = torch.randperm(num_pages, device="cuda")[: BATCH * pages_per_seq].view(
                    BATCH, pages_per_seq).int()
            else:
                cache_rows = BATCH + 1 if extras else BATCH  # an unused row when cache_batch_idx picks rows
                k_cache = torch.randn(cache_rows, S_CACHE, NHEADS_K, HEAD_DIM, device="cuda", dtype=dtype)
                block_table = None
            v_cache = torch.randn_like(k_cache)
            q = torch.randn(BATCH, seqlen_q, NHEADS, HEAD_DIM, device="cuda", dtype=dtype)
            k = torch.randn(BATCH, s_new, NHEADS_K, HEAD_DIM, device="cuda", dtype=dtype) if s_new else None
            v = torch.randn_like(k) if s_new else None
            capacity = pages_per_seq * PAGE if paged else S_CACHE
            # The second sequence's append runs past the capacity: those rows are dropped.
            cache_seqlens = torch.tensor([70, capacity - 2], dtype=torch.int32, device="cuda")
            cos = torch.rand(capacity, HEAD_DIM // 4, device="cuda", dtype=dtype)
            sin = torch.rand(capacity, HEAD_DIM // 4, device="cuda", dtype=dtype)
            kwargs = {}
            if extras:
                kwargs = dict(cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32, device="cuda"),
                              cache_leftpad=torch.tensor([3, 0], dtype=torch.int32, device="cuda"))
            rotary = dict(rotary_cos=cos, rotary_sin=sin) if s_new else {}  # rotary rotates appended keys
            out, lse = flash_attn2.flash_attn_with_kvcache(
                q, k_cache, v_cache, k, v, **rotary, cache_seqlens=cache_seqlens,
                block_table=block_table, causal=causal, window_size=window, num_splits=splits,
                return_softmax_lse=True, **kwargs)
            torch.cuda.synchronize()
            print(f"paged {paged} s_q {seqlen_q} s_new {s_new} causal {causal} window {window} splits {splits} "
                  f"extras {extras}: finite {bool(torch.isfinite(out).all())}", flush=True)
    print("done")


if __name__ == "__main__":
    main()
