"""Paper A's variance study (analysis/variance_study.py): its Gaussian helpers against torch.

A tiny study run through opd-study is in tests/commands/test_study.py (the full study is
`make study-variance`). The discounted advantage it uses is objectives.discounted_returns,
tested in tests/objectives/test_advantages.py.
"""

import torch

from opd_cli.analysis.variance_study import Policy, gaussian_kl, log_prob


def test_gaussian_helpers_against_torch():
    mu_p, ls_p, mu_q, ls_q = torch.tensor(0.3), torch.tensor(-0.2), torch.tensor(-0.5), torch.tensor(0.4)
    p = torch.distributions.Normal(mu_p, ls_p.exp())
    q = torch.distributions.Normal(mu_q, ls_q.exp())
    torch.testing.assert_close(gaussian_kl(mu_p, ls_p, mu_q, ls_q), torch.distributions.kl_divergence(p, q))
    torch.testing.assert_close(log_prob(mu_p, ls_p, torch.tensor(1.1)), p.log_prob(torch.tensor(1.1)))
    mu, ls = Policy(8)(torch.zeros(5, 3))
    assert mu.shape == (5,) and (ls >= -3).all() and (ls <= 1).all()
