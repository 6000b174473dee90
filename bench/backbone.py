"""What the backbone costs on this machine: seconds per sample, peak memory, and GFLOP/s
against a matrix-multiply peak measured in the same run.

Configs: whole-human size (12 layers x 512 dim x 8 heads, d_hid 512) at 2,000 gene tokens,
and the small demo config (4 x 128 x 4) at 1,000 tokens. Frozen weights; forward+backward
back-propagates to the input embeddings, as adapter training does. Float32 and bfloat16
autocast. Each measurement runs in its own subprocess so peak RSS belongs to it alone.

Usage: python bench/backbone.py [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {
    "whole-human 12x512, 2000 tokens": dict(nlayers=12, d_model=512, nhead=8, d_hid=512, tokens=2000),
    "demo 4x128, 1000 tokens": dict(nlayers=4, d_model=128, nhead=4, d_hid=128, tokens=1000),
}


def forward_flops(nlayers, d_model, d_hid, tokens, **_) -> float:
    """Multiply-adds x 2 of one forward pass per sample (matmuls only; norms and activations excluded)."""
    T, d = tokens, d_model
    per_layer = 2 * T * d * 3 * d + 2 * 2 * T * T * d + 2 * T * d * d + 2 * 2 * T * d * d_hid
    embed = 2 * T * d * d  # value encoder linear2
    decoder = 2 * T * (2 * d * d + d)
    return nlayers * per_layer + embed + decoder


def measure(name: str, dtype: str, batch: int, repeats: int) -> dict:
    import torch

    from scdca.nn.backbone import Backbone, BackboneConfig

    c = CONFIGS[name]
    torch.manual_seed(0)
    model = Backbone(
        BackboneConfig(
            ntoken=60697,
            d_model=c["d_model"],
            nhead=c["nhead"],
            d_hid=c["d_hid"],
            nlayers=c["nlayers"],
            pad_token_id=60694,
        )
    ).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 60000, (batch, c["tokens"]))
    values = torch.rand(batch, c["tokens"]) * 4
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.autocast("cpu", enabled=False)

    def fwd():
        with torch.no_grad(), ctx:
            model(ids, values)

    def fwd_bwd():
        with ctx:
            h0 = model.embed(ids, values).detach().requires_grad_(True)
            h = model.transformer_encoder(h0)
            model.decoder(h).float().pow(2).mean().backward()

    out = {}
    for label, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[label] = min(times) / batch
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["gflop_fwd"] = forward_flops(**c) / 1e9
    return out


def matmul_peak(dtype: str) -> float:
    import torch

    n = 2048
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: run one measurement
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.batch, args.repeats)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    peaks = {d: matmul_peak(d) for d in ("fp32", "bf16")}
    print(f"measured matmul peak (2048^2): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    print(
        f"{'config':<34}{'dtype':>6}{'fwd s/sample':>14}{'fwd+bwd s/sample':>18}{'peak MB':>9}"
        f"{'fwd GFLOP/s':>13}{'% of matmul':>13}"
    )
    for name in CONFIGS:
        for dtype in ("fp32", "bf16"):
            res = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    name,
                    dtype,
                    "--batch",
                    str(args.batch),
                    "--repeats",
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rate = r["gflop_fwd"] / r["fwd"]
            print(
                f"{name:<34}{dtype:>6}{r['fwd']:>14.3f}{r['fwd_bwd']:>18.3f}{r['peak_rss_mb']:>9.0f}"
                f"{rate:>13.0f}{rate / peaks[dtype]:>13.0%}"
            )


if __name__ == "__main__":
    main()
