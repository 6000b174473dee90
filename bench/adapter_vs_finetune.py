"""scDCA against full fine-tuning on the same backbone and batch: step time and peak memory.

One optimiser step = forward, backward, Adam update, for a batch of conditions. Each model
runs in its own subprocess so its peak resident memory is its own. Prints ratios
scdca / finetune (the paper, on a GPU: 1.07 / 1.20 s per epoch = 0.89; 45 / 53 GB = 0.85).

Usage: python bench/adapter_vs_finetune.py [--size whole-human|demo] [--tokens 1000] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = {
    "whole-human": dict(nlayers=12, d_model=512, nhead=8, d_hid=512),
    "demo": dict(nlayers=4, d_model=128, nhead=4, d_hid=128),
}


def one(variant: str, size: str, tokens: int, batch: int, steps: int) -> dict:
    import torch

    from scdca.models.scdca.config import ScDCAConfig
    from scdca.models.scdca.net import ScDCANet
    from scdca.nn.backbone import Backbone, BackboneConfig

    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(ntoken=60697, pad_token_id=60694, dropout=0.0, **SIZES[size]))
    net = ScDCANet(bb, torch.arange(tokens), cond_dim=769, cfg=ScDCAConfig(variant=variant))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    values, cond, target = torch.rand(batch, tokens) * 4, torch.randn(batch, 769), torch.rand(batch, tokens)

    reference = net.reference_output(values)  # per cell line, computed once before training (as in fit)

    def step():
        loss = ((net(values, cond, reference=reference) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocates optimiser state)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {
        "step_s": min(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in net.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=list(SIZES), default="whole-human")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.size, a.tokens, a.batch, a.steps)))
        return
    res = {}
    for variant in ("adapter", "finetune"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                variant,
                "--size",
                a.size,
                "--tokens",
                str(a.tokens),
                "--batch",
                str(a.batch),
                "--steps",
                str(a.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    s, f = res["adapter"], res["finetune"]
    print(f"{a.size} backbone, {a.tokens} gene tokens, batch {a.batch}, CPU")
    print(f"{'model':<10}{'step s':>9}{'peak RSS MB':>13}{'trainable':>12}{'of total':>12}")
    for name, r in (("scdca", s), ("finetune", f)):
        print(f"{name:<10}{r['step_s']:>9.2f}{r['peak_rss_mb']:>13.0f}{r['trainable']:>12,}{r['total']:>12,}")
    print(
        f"ratio scdca/finetune: step time {s['step_s'] / f['step_s']:.2f}, peak memory "
        f"{s['peak_rss_mb'] / f['peak_rss_mb']:.2f} (paper on GPU: 0.89 and 0.85)"
    )


if __name__ == "__main__":
    main()
