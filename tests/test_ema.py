"""The trainer's EMA: the closed form of the update, and a frozen base shared rather than copied (the LoRA layout
of an SD-sized model would otherwise hold a second copy of its base)."""

import torch
from torch import nn

from fastdiff.training.ema import EMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    model[0].requires_grad_(False)  # a frozen base
    return model


def test_ema_update_is_the_closed_form_on_trained_weights():
    model = _model()
    ema = EMA(model, decay=0.9)
    before = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model[1].weight, 0.9 * before + 0.1 * (before + 1.0))
    assert not any(p.requires_grad for p in ema.model[1].parameters()) and model[1].weight.requires_grad


def test_ema_shares_frozen_parameters_instead_of_copying_them():
    model = _model()
    ema = EMA(model, decay=0.9)
    assert ema.model[0].weight is model[0].weight and ema.model[0].bias is model[0].bias  # no second base
    assert ema.model[1].weight.data_ptr() != model[1].weight.data_ptr()
    copied = {p.data_ptr() for p in ema.model.parameters()} - {p.data_ptr() for p in model.parameters()}
    assert len(copied) == 2  # only the trained layer's weight and bias
    frozen = model[0].weight.detach().clone()
    ema.update(model)
    torch.testing.assert_close(model[0].weight, frozen)
    state = ema.state_dict()["model"]
    assert set(state) == set(model.state_dict())  # checkpoints keep the whole network
