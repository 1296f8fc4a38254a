#!/usr/bin/env python3
"""Where a decode step's time goes: each CUDA kernel of one flash_attn_with_kvcache call (the append, the
attention, the split combine), from torch.profiler, beside the call's wall time per step.

Same shapes as benchmark_decode.py (s_q = 1, hdim 128, h = 32, h_k = 8, bf16, one new token per call).

    python benchmarks/profile_decode.py --batches 1,8 --seqlens 4096,32768 [--paged]
"""

import argparse
from collections import defaultdict

import torch
from benchmark_decode import make_config, ours_fn
from checkout import import_flash_attn2

STEPS = 50


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seqlens", default="4096,32768")
    parser.add_argument("--paged", action="store_true")
    parser.add_argument("--num-splits", type=int, default=0)
    args = parser.parse_args()
    flash_attn2 = import_flash_attn2()
    from torch.profiler import ProfilerActivity, profile

    for batch in (int(b) for b in args.batches.split(",")):
        for seqlen in (int(s) for s in args.seqlens.split(",")):
            cfg = make_config(batch, seqlen)
            fn = ours_fn(flash_attn2, cfg, args.paged, args.num_splits)
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(STEPS):
                    fn()
                torch.cuda.synchronize()
            per_kernel = defaultdict(float)
            for avg in prof.key_averages():
                self_us = getattr(avg, "self_device_time_total", None)
                if self_us is None:
                    self_us = avg.self_cuda_time_total
                if self_us > 0:
                    per_kernel[avg.key[:90]] += self_us / STEPS
            print(f"-- batch {batch} cache {seqlen} {'paged' if args.paged else 'dense'}")
            for name, us in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
                print(f"   {us:9.2f} us  {name}")
            del cfg
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
