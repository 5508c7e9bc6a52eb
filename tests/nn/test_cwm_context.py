"""The CWM's context standardization: set at the first call, saved, and only a rescaling."""

import pytest
import torch

from pyro_cwm import CWM


def _pair(seed=0):
    torch.manual_seed(seed)
    scaled = CWM(2, 3, context_dim=2)
    raw = CWM(2, 3, context_dim=2, standardize_context=False)
    raw.load_state_dict(scaled.state_dict())
    for p in scaled.parameters():  # a context-dependent CWM, not the constant start
        p.data.add_(0.3 * torch.randn_like(p))
    raw.load_state_dict(scaled.state_dict())
    return scaled, raw


def test_first_context_sets_the_scaling_and_later_calls_keep_it():
    scaled, raw = _pair()
    train = torch.tensor([[10.0, -3.0], [14.0, -1.0], [12.0, -2.0], [12.0, 0.0]])
    z = torch.randn(4, 2)
    mean, std = train.mean(0), train.std(0)
    expected = raw((train - mean) / std).log_prob(z)
    torch.testing.assert_close(scaled(train).log_prob(z), expected)
    other = torch.randn(7, 2) * 5
    torch.testing.assert_close(scaled(other).context, (other - mean) / std)
    assert bool(scaled.context_set)
    clone = CWM(**scaled.config())
    clone.load_state_dict(scaled.state_dict())
    torch.testing.assert_close(clone(other).log_prob(z[:1]), scaled(other).log_prob(z[:1]))


def test_one_row_or_constant_columns_leave_the_context_unscaled():
    scaled, raw = _pair(1)
    z = torch.randn(3, 2)
    first = torch.tensor([[5.0, 1.0]])
    torch.testing.assert_close(scaled(first).log_prob(z), raw(first).log_prob(z))
    scaled, raw = _pair(2)
    constant = torch.tensor([[5.0, 1.0], [7.0, 1.0], [9.0, 1.0]])
    assert scaled(constant).context[:, 1].eq(0).all()  # centred, std 0 -> scale 1
    assert scaled.context_scale[1] == 1


def test_nan_rows_do_not_set_the_scaling_and_the_check_names_the_site():
    cwm = CWM(1, 2, context_dim=1)
    bad = torch.tensor([[float("nan")], [1.0], [3.0]])
    q = cwm(bad)
    assert cwm.context_loc.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="site 'z'.*NaN"):
        q.check_context("z")
