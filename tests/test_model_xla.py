"""The model under XLA (CPU PJRT): parity with eager PyTorch, and a bounded compile count."""

import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met

from modxla.model import build_model, lm_loss

pytestmark = pytest.mark.slow  # every test here compiles XLA graphs


def _compiles() -> int:
    data = met.metric_data("CompileTime")
    return data[0] if data else 0


@pytest.mark.parametrize("routing", ["topk", "predictor", "router"])
def test_xla_matches_eager(tiny_cfg, routing):
    cfg = tiny_cfg(**{"model.mod.aux_loss_weight": 0.1})
    torch.manual_seed(0)
    tokens = torch.randint(0, 128, (2, 32))
    eager = build_model(cfg.model, seed=0)
    dev = torch_xla.device()
    xla = build_model(cfg.model, seed=0).to(dev)
    out_e = eager(tokens, routing=routing)
    out_x = xla(tokens.to(dev), routing=routing)
    (lm_loss(out_e.logits, tokens) + out_e.aux_loss).backward()
    (lm_loss(out_x.logits, tokens.to(dev)) + out_x.aux_loss).backward()
    torch_xla.sync()  # one graph for everything; the transfers below then compile nothing
    torch.testing.assert_close(out_x.logits.cpu(), out_e.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(out_x.routing, out_e.routing, strict=True):
        assert torch.equal(a.idx.cpu(), b.idx)  # the same tokens are routed
    for (name, px), pe in zip(xla.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(px.grad.cpu(), pe.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_five_train_steps_compile_at_most_two_graphs(tiny_cfg):
    cfg = tiny_cfg(**{"model.mod.aux_loss_weight": 0.1})
    dev = torch_xla.device()
    model = build_model(cfg.model, seed=0).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(0)
    before = _compiles()
    losses = []
    for _ in range(5):
        tokens = torch.randint(0, 128, (2, 33)).to(dev)  # fresh data each step
        out = model(tokens[:, :-1])
        loss = lm_loss(out.logits, tokens[:, 1:]) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch_xla.sync()
        losses.append(loss.detach())
    assert all(torch.isfinite(x.cpu()) for x in losses)
    assert _compiles() - before <= 2
