"""Losses and agreement metrics against a hand-written float64 reference."""

import math

import pytest
import torch

from kangaroo_lit.losses import IGNORE_INDEX, sgp_loss


def reference_terms(main, exit_, labels, beta, kind, kd_weight):
    """Loop-by-loop float64 reference: position t predicts token t+1, -100 labels skipped."""
    main, exit_ = main.double(), exit_.double()
    ce_main, ce_exit, kd, accept, agree, n = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            p = torch.softmax(main[b, t], -1)
            q = torch.softmax(exit_[b, t], -1)
            ce_main += -math.log(p[target])
            ce_exit += -math.log(q[target])
            kd += -sum(float(p[v]) * math.log(q[v]) for v in range(p.numel()))
            accept += sum(min(float(p[v]), float(q[v])) for v in range(p.numel()))
            agree += float(int(p.argmax()) == int(q.argmax()))
            n += 1
    ce_main, ce_exit, kd, accept, agree = (x / n for x in (ce_main, ce_exit, kd, accept, agree))
    loss_exit = {"ce": ce_exit, "kd": kd, "mix": kd_weight * kd + (1 - kd_weight) * ce_exit,
                 "accept": 1 - accept}[kind]
    return ce_main + beta * loss_exit, ce_main, loss_exit, accept, agree


@pytest.mark.parametrize("kind", ["ce", "kd", "mix", "accept"])
def test_sgp_loss_matches_float64_reference(kind):
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 7, 11
    main = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    exit_ = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    terms = sgp_loss(main, exit_, labels, beta_exit=0.7, exit_loss=kind, kd_weight=0.3)
    loss, loss_main, loss_exit, accept, agree = reference_terms(main, exit_, labels, 0.7, kind, 0.3)
    assert terms.loss.item() == pytest.approx(loss, rel=1e-6)
    assert terms.loss_main.item() == pytest.approx(loss_main, rel=1e-6)
    assert terms.loss_exit.item() == pytest.approx(loss_exit, rel=1e-6)
    assert terms.expected_accept.item() == pytest.approx(accept, rel=1e-6)
    assert terms.top1_agree.item() == pytest.approx(agree, rel=1e-9)
    assert terms.num_tokens.item() == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_expected_accept_is_one_for_identical_paths_and_kd_gradient_ignores_teacher():
    g = torch.Generator().manual_seed(1)
    main = torch.randn(1, 5, 9, generator=g, requires_grad=True)
    exit_ = main.detach().clone().requires_grad_(True)
    labels = torch.randint(0, 9, (1, 5), generator=g)
    terms = sgp_loss(main, exit_, labels, beta_exit=1.0, exit_loss="kd")
    assert terms.expected_accept.item() == pytest.approx(1.0)
    assert terms.top1_agree.item() == 1.0
    terms.loss_exit.backward()
    assert main.grad is None  # p_full is a detached teacher
    assert exit_.grad is not None and exit_.grad.abs().sum() < 1e-5  # at the optimum q == p


def test_acceptance_loss_moves_q_towards_p_and_leaves_the_teacher_alone():
    g = torch.Generator().manual_seed(3)
    main = torch.randn(2, 6, 9, generator=g, requires_grad=True)
    exit_ = torch.randn(2, 6, 9, generator=g, requires_grad=True)
    labels = torch.randint(0, 9, (2, 6), generator=g)
    before = sgp_loss(main, exit_, labels, beta_exit=1.0, exit_loss="accept")
    before.loss_exit.backward()
    assert main.grad is None and exit_.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = exit_ - 5.0 * exit_.grad
    after = sgp_loss(main.detach(), stepped, labels, beta_exit=1.0, exit_loss="accept")
    assert after.expected_accept > before.expected_accept  # descending it raises the acceptance


def test_no_target_tokens_is_an_error():
    labels = torch.full((1, 4), IGNORE_INDEX)
    with pytest.raises(ValueError, match="no target tokens"):
        sgp_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), labels)


def test_unknown_exit_loss():
    labels = torch.tensor([[1, 2, 0]])
    with pytest.raises(ValueError, match="ce, kd, mix"):
        sgp_loss(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3), labels, exit_loss="kl")


def restricted_reference_terms(main, exit_, labels, vocab, beta, kind, kd_weight):
    """Float64 loop reference for a restricted draft head: ``exit_`` scores the token ids ``vocab`` only."""
    main, exit_ = main.double(), exit_.double()
    ids = [int(v) for v in vocab]
    ce_main, ce_exit, kd, accept, agree, n, n_in = 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX:
                continue
            p = torch.softmax(main[b, t], -1)
            q = torch.softmax(exit_[b, t], -1)  # over the K ids; zero elsewhere
            ce_main += -math.log(p[target])
            if target in ids:
                ce_exit += -math.log(q[ids.index(target)])
                n_in += 1
            kd += -sum(float(p[v]) * math.log(q[i]) for i, v in enumerate(ids))
            accept += sum(min(float(p[v]), float(q[i])) for i, v in enumerate(ids))
            agree += float(int(p.argmax()) in ids and ids[int(q.argmax())] == int(p.argmax()))
            n += 1
    ce_main, kd, accept, agree = (x / n for x in (ce_main, kd, accept, agree))
    ce_exit = ce_exit / n_in if n_in else 0.0
    loss_exit = {"ce": ce_exit, "kd": kd, "mix": kd_weight * kd + (1 - kd_weight) * ce_exit,
                 "accept": 1 - accept}[kind]
    return ce_main + beta * loss_exit, ce_main, loss_exit, accept, agree


@pytest.mark.parametrize("kind", ["ce", "kd", "mix", "accept"])
def test_restricted_draft_vocab_matches_float64_reference(kind):
    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 9, 13
    vocab = torch.tensor([0, 2, 3, 5, 8, 12])  # K = 6 ids
    main = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    main[0, 1, 3] = 9.0  # a position whose full argmax is in the set ...
    main[1, 2, 4] = 9.0  # ... and one where it is not
    exit_ = torch.randn(B, T, vocab.numel(), generator=g, dtype=torch.float64) * 2
    exit_[0, 1, 2] = 9.0  # draft picks id 3 there: agreement
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = IGNORE_INDEX
    labels[2, 6:] = IGNORE_INDEX
    labels[1, 3] = 4  # a label outside the set (ignored by ce)
    labels[1, 4] = 5  # and one inside
    terms = sgp_loss(main, exit_, labels, beta_exit=0.7, exit_loss=kind, kd_weight=0.3, draft_vocab=vocab)
    loss, loss_main, loss_exit, accept, agree = restricted_reference_terms(main, exit_, labels, vocab, 0.7, kind, 0.3)
    assert terms.loss.item() == pytest.approx(loss, rel=1e-6)
    assert terms.loss_main.item() == pytest.approx(loss_main, rel=1e-6)
    assert terms.loss_exit.item() == pytest.approx(loss_exit, rel=1e-6)
    assert terms.expected_accept.item() == pytest.approx(accept, rel=1e-6)
    assert terms.top1_agree.item() == pytest.approx(agree, rel=1e-6)
    assert 0 < agree < 1 and accept < 1


def test_restricted_draft_vocab_ce_without_targets_in_the_set_is_zero_with_a_gradient():
    g = torch.Generator().manual_seed(0)
    vocab = torch.tensor([0, 1])
    exit_ = torch.randn(1, 4, 2, generator=g).requires_grad_()
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7]])
    main = torch.randn(1, 4, 9, generator=g)
    main[..., 5:] += 20.0  # the full model's top token lies outside the set: no agreement possible
    terms = sgp_loss(main, exit_, labels, exit_loss="ce", draft_vocab=vocab)
    assert terms.loss_exit.item() == 0.0 and terms.top1_agree.item() == 0.0
    terms.loss.backward()
    assert exit_.grad is not None


def test_full_vocabulary_as_draft_vocab_equals_the_unrestricted_loss():
    g = torch.Generator().manual_seed(3)
    main = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)
    exit_ = torch.randn(2, 6, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 6), generator=g)
    for kind in ("ce", "kd", "mix"):
        full = sgp_loss(main, exit_, labels, exit_loss=kind)
        same = sgp_loss(main, exit_, labels, exit_loss=kind, draft_vocab=torch.arange(7))
        for name in ("loss", "loss_exit", "expected_accept", "top1_agree"):
            assert getattr(same, name).item() == pytest.approx(getattr(full, name).item(), rel=1e-6)
