"""scDCA against full fine-tuning on the same backbone and batch: step time and peak memory.

One optimiser step = forward, backward, Adam update, for a batch of conditions. Each setting
runs in its own subprocess so its peak resident memory is its own. Prints each setting's ratio
to full fine-tuning in fp32 (the paper, on a GPU: 1.07 / 1.20 s per epoch = 0.89; 45 / 53 GB
= 0.85), and the bf16 settings' ratio to fine-tuning under bf16 autocast (a like-for-like
precision). The settings, all the same method:

- scdca: the adapters with the backbone in fp32 (the default);
- +recompute: the frozen layers' activations recomputed in the backward pass (`recompute_frozen`);
- +bf16 frozen: the frozen backbone stored and run in bf16, the adapters in fp32 (`frozen_dtype`);
- finetune: every weight trains, fp32; finetune bf16: the same under bf16 autocast (fp32 weights).

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


# setting -> (ScDCAConfig fields, bf16 autocast around the forward pass)
SETTINGS = {
    "scdca": (dict(variant="adapter"), False),
    "scdca +recompute": (dict(variant="adapter", recompute_frozen=True), False),
    "scdca +bf16 frozen": (dict(variant="adapter", frozen_dtype="bfloat16"), False),
    "scdca +bf16 +recompute": (dict(variant="adapter", frozen_dtype="bfloat16", recompute_frozen=True), False),
    "finetune": (dict(variant="finetune"), False),
    "finetune bf16": (dict(variant="finetune"), True),
}


def one(setting: str, size: str, tokens: int, batch: int, steps: int) -> dict:
    import torch

    from scdca.models.scdca.config import ScDCAConfig
    from scdca.models.scdca.net import ScDCANet
    from scdca.nn.backbone import Backbone, BackboneConfig
    from scdca.nn.distributed import autocast

    fields, bf16 = SETTINGS[setting]
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(ntoken=60697, pad_token_id=60694, dropout=0.0, **SIZES[size]))
    net = ScDCANet(bb, torch.arange(tokens), cond_dim=769, cfg=ScDCAConfig(**fields))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    values, cond, target = torch.rand(batch, tokens) * 4, torch.randn(batch, 769), torch.rand(batch, tokens)

    reference = net.reference_output(values)  # per cell line, computed once before training (as in fit)

    def step():
        with autocast(values.device, "bf16" if bf16 else "fp32"):
            pred = net(values, cond, reference=reference)
        loss = ((pred.float() - target) ** 2).mean()
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
    for setting in SETTINGS:
        args = ["--one", setting, "--size", a.size, "--tokens", str(a.tokens), "--batch", str(a.batch)]
        out = subprocess.run(
            [sys.executable, __file__, *args, "--steps", str(a.steps)], capture_output=True, text=True, check=True
        )
        res[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    base, base16 = res["finetune"], res["finetune bf16"]
    print(f"{a.size} backbone, {a.tokens} gene tokens, batch {a.batch}, CPU; ratios to finetune (fp32)")
    print(f"{'setting':<24}{'step s':>8}{'peak RSS MB':>13}{'time':>7}{'memory':>8}{'trainable':>12}{'of total':>12}")
    for setting, r in res.items():
        print(
            f"{setting:<24}{r['step_s']:>8.2f}{r['peak_rss_mb']:>13.0f}{r['step_s'] / base['step_s']:>7.2f}"
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:>8.2f}{r['trainable']:>12,}{r['total']:>12,}"
        )
    s, b = res["scdca +bf16 frozen"], res["scdca +bf16 +recompute"]
    print(
        f"like-for-like bf16 (to finetune bf16): +bf16 frozen time {s['step_s'] / base16['step_s']:.2f} memory "
        f"{s['peak_rss_mb'] / base16['peak_rss_mb']:.2f}; +bf16 +recompute time "
        f"{b['step_s'] / base16['step_s']:.2f} memory {b['peak_rss_mb'] / base16['peak_rss_mb']:.2f}"
    )
    d = res["scdca"]
    print(
        f"ratio scdca/finetune: step time {d['step_s'] / base['step_s']:.2f}, peak memory "
        f"{d['peak_rss_mb'] / base['peak_rss_mb']:.2f} (paper on GPU: 0.89 and 0.85)"
    )


if __name__ == "__main__":
    main()
