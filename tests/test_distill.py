import pytest
import torch
import torch.nn.functional as F

from pipeline.train.distill import chunked_kd_loss, token_divergence


def _logits(seed, n=7, vocab=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3


def test_forward_kl_matches_torch_kl_div():
    s, t = _logits(0), _logits(1)
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_divergence(s, t).double(), ref, rtol=1e-5, atol=1e-6)


def test_reverse_kl_is_forward_kl_with_roles_swapped():
    s, t = _logits(2), _logits(3)
    torch.testing.assert_close(token_divergence(s, t, divergence="reverse_kl"), token_divergence(t, s))


def test_jsd_against_probabilities():
    s, t = _logits(4), _logits(5)
    beta = 0.3
    ps, pt = s.softmax(-1), t.softmax(-1)
    m = beta * ps + (1 - beta) * pt
    ref = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    torch.testing.assert_close(token_divergence(s, t, divergence="jsd", beta=beta).double(), ref, rtol=1e-5, atol=1e-6)
    # symmetric at beta = 0.5
    torch.testing.assert_close(token_divergence(s, t, divergence="jsd"), token_divergence(t, s, divergence="jsd"))


def test_divergences_vanish_when_student_equals_teacher():
    t = _logits(6)
    for div in ("forward_kl", "reverse_kl", "jsd"):
        assert token_divergence(t, t, divergence=div).abs().max() < 1e-6


def test_temperature_scales_softmax_and_multiplies_by_t_squared():
    s, t = _logits(7), _logits(8)
    ref = token_divergence(s / 2.0, t / 2.0) * 4.0
    torch.testing.assert_close(token_divergence(s, t, temperature=2.0), ref)


def test_top_k_uses_the_teachers_top_tokens_renormalised():
    s, t = _logits(9), _logits(10)
    idx = t.topk(3, -1).indices
    ref = token_divergence(s.gather(-1, idx), t.gather(-1, idx))
    torch.testing.assert_close(token_divergence(s, t, top_k=3), ref)
    # with k = vocab it is the full forward KL
    torch.testing.assert_close(token_divergence(s, t, top_k=11), token_divergence(s, t))


def _heads_and_states(seed=0, batch=2, seq=5, hidden=6, vocab=13):
    torch.manual_seed(seed)
    s_head = torch.nn.Linear(hidden, vocab, bias=False)
    t_head = torch.nn.Linear(hidden, vocab, bias=False)
    s_h = torch.randn(batch, seq, hidden, requires_grad=True)
    t_h = torch.randn(batch, seq, hidden)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :2] = -100  # a prompt
    labels[1, -1] = -100  # padding
    return s_head, t_head, s_h, t_h, labels


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_loss_and_gradients_equal_the_unchunked_reference(divergence):
    s_head, t_head, s_h, t_h, labels = _heads_and_states()
    keep = labels != -100
    s_logits, t_logits = s_head(s_h)[keep], t_head(t_h)[keep].detach()
    ref = 0.75 * token_divergence(s_logits, t_logits, divergence=divergence).mean() + 0.25 * F.cross_entropy(
        s_logits, labels[keep]
    )
    ref.backward()
    ref_grads = (s_h.grad.clone(), s_head.weight.grad.clone())
    for chunk in (1, 3, 1000):
        s_h.grad, s_head.weight.grad = None, None
        loss, parts = chunked_kd_loss(
            s_h, t_h, labels, s_head, t_head, divergence=divergence, ce_weight=0.25, chunk_size=chunk
        )
        loss.backward()
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(s_h.grad, ref_grads[0])
        torch.testing.assert_close(s_head.weight.grad, ref_grads[1])
        assert set(parts) == {"kd", "ce"}
    assert t_head.weight.grad is None  # the teacher never gets gradients


def test_all_masked_is_an_error():
    s_head, t_head, s_h, t_h, labels = _heads_and_states()
    with pytest.raises(ValueError, match="no position carries loss"):
        chunked_kd_loss(s_h, t_h, torch.full_like(labels, -100), s_head, t_head)
