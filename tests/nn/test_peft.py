import pytest
import torch

from scdca.errors import ScdcaInputError
from scdca.nn.backbone import resolve
from scdca.nn.peft import METHODS, PeftConfig, apply, trainable_state

GENES = [f"g{i}" for i in range(12)]


def _inputs(backbone, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([backbone.vocab["<cls>"]] + [backbone.vocab[x] for x in GENES]).expand(n, -1)
    return ids, torch.rand(n, len(GENES) + 1, generator=g) * 3


@pytest.mark.parametrize("method", METHODS)
def test_every_method_starts_as_the_frozen_model_and_trains_only_its_parts(method):
    frozen = resolve("random:2x16", genes=GENES).eval()
    ids, values = _inputs(frozen)
    before = frozen.encode(ids, values)
    model = apply(resolve("random:2x16", genes=GENES), PeftConfig(method=method, r=2, prefix_tokens=3)).eval()
    torch.testing.assert_close(model.encode(ids, values), before, rtol=0, atol=1e-6)
    n_frozen = sum(p.numel() for p in frozen.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = {"full": n_frozen, "linear": 0}
    if method in expected:
        assert n_train == expected[method]
    else:
        assert 0 < n_train < n_frozen
        assert set(trainable_state(model)) == {n for n, p in model.named_parameters() if p.requires_grad}
    # one optimiser step on the method's parameters moves the output: they are wired in
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        model.train()
        opt = torch.optim.SGD(params, lr=0.5)
        direction = torch.randn(before.shape, generator=torch.Generator().manual_seed(1))  # LayerNorm'd outputs
        for _ in range(2):  # zero-initialised outputs need a first step before their inputs get gradients
            opt.zero_grad()
            (model.encode(ids, values) * direction).mean().backward()  # (not their norm) can move
            opt.step()
        model.eval()
        assert not torch.allclose(model.encode(ids, values), before, atol=1e-4)


def test_lora_targets_attention_and_feed_forward_through_hf_peft():
    model = apply(resolve("random:2x16", genes=GENES), PeftConfig(method="lora", r=2, lora_on="attention"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and not any("linear1" in n for n in names)
    ids, values = _inputs(model)
    before = model.eval().encode(ids, values)
    with torch.no_grad():  # a non-zero LoRA update of q/k/v must reach the attention output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    assert not torch.allclose(model.encode(ids, values), before, atol=1e-4)
    ff = apply(resolve("random:2x16", genes=GENES), PeftConfig(method="lora", r=2, lora_on="ff"))
    names = [n for n, p in ff.named_parameters() if p.requires_grad]
    assert {n.split(".")[3] for n in names} == {"linear1", "linear2"}  # transformer layers' feed-forward only


def test_bad_peft_settings_are_refused_by_name():
    with pytest.raises(ScdcaInputError, match="method: 'ia3'"):
        PeftConfig(method="ia3")
    with pytest.raises(ScdcaInputError, match="lora_on"):
        PeftConfig(lora_on="mlp")
