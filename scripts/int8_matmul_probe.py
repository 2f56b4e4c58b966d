"""Milliseconds of one FP32 product (F.linear), one int8 product (torch._int_mm) and the input's int8
quantization at tiny.en's Linear shapes, on one thread: what the int8 path can gain per layer.

    python scripts/int8_matmul_probe.py
"""
import time

import torch

torch.set_num_threads(1)
torch.manual_seed(0)


def ms(f, n=20):
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


# (tokens, in, out): encoder attention / fc1 / fc2 over the 1500-frame window, decoder steps
for m, k, n in [(1500, 384, 384), (1500, 384, 1536), (1500, 1536, 384), (24, 384, 384), (8, 384, 1536)]:
    x, w = torch.randn(m, k), torch.randn(n, k)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    fp = ms(lambda: torch.nn.functional.linear(x, w))
    i8 = ms(lambda: torch._int_mm(xq, wq))
    q = ms(lambda: x.div(0.05).round_().clamp_(-127, 127).to(torch.int8))
    print(f"{m:5d}x{k:4d}x{n:4d}  fp32 {fp:7.3f} ms  int8 {i8:7.3f} ms ({fp / i8:4.1f}x)  quantize input {q:6.3f} ms")
