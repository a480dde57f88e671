"""Each loss against an independent computation (explicit loops over python floats) on fixed tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from zsd.losses import (CLIP_LOGIT_SCALE_INIT, Criterion, clip_loss, contrastive_image_loss, cosine_loss, l2_loss,
                        mp_loss, mse_loss)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    s = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(4, 5, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 2, 2, 1, 0, 2])  # class 3 is absent from the batch
    return s, t, text, labels


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def test_distance_losses(batch):
    s, t, _, _ = batch
    n = len(s)
    d = [math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(s[i], t[i]))) for i in range(n)]
    assert l2_loss(s, t).item() == pytest.approx(sum(d) / n, rel=1e-12)
    assert mse_loss(s, t).item() == pytest.approx(sum(x * x for x in d) / n, rel=1e-12)
    assert cosine_loss(s, t).item() == pytest.approx(sum(1 - dot(s[i], t[i]) for i in range(n)) / n, rel=1e-12)


def test_contrastive_image_loss_is_paper_eq1(batch):
    s, t, _, _ = batch
    tau = 0.07
    n = len(s)
    total = 0.0
    for i in range(n):
        num = math.exp(dot(s[i], t[i]) / tau)
        den = sum(math.exp(dot(s[i], t[k]) / tau) for k in range(n))
        total += -math.log(num / den)
    assert contrastive_image_loss(s, t, 1 / tau).item() == pytest.approx(total / n, rel=1e-10)


def test_clip_loss_is_cross_entropy_over_class_prompts(batch):
    s, _, text, labels = batch
    scale = 20.0
    total = 0.0
    for i in range(len(s)):
        logits = [scale * dot(s[i], z) for z in text]
        total += -(logits[labels[i]] - math.log(sum(math.exp(x) for x in logits)))
    assert clip_loss(s, text, labels, scale).item() == pytest.approx(total / len(s), rel=1e-10)


def test_mp_loss_matches_the_issue_formula(batch):
    s, _, text, labels = batch
    tau = 0.1
    K, n = len(text), len(s)
    total = 0.0
    for k in range(K):
        count = sum(1 for j in range(n) if labels[j] == k)
        for i in range(n):
            p = (1.0 if labels[i] == k else 0.0) / count if count else 0.0
            if p:
                den = sum(math.exp(dot(s[i], text[j]) / tau) for j in range(K))
                total += p * math.log(math.exp(dot(s[i], text[k]) / tau) / den)
    expected = -total / K
    assert mp_loss(s, text, labels, 1 / tau).item() == pytest.approx(expected, rel=1e-10)


def test_criterion_weights_terms_and_normalises_the_student(batch):
    s, t, text, labels = batch
    crit = Criterion({"l2": 1.0, "clip": 0.5, "contrastive-image": 2.0}, text.float())
    total, terms = crit(3.0 * s.float(), t.float(), labels)  # unnormalised student output
    scale = math.exp(CLIP_LOGIT_SCALE_INIT)
    assert terms["l2"].item() == pytest.approx(l2_loss(s, t).item(), rel=1e-5)
    assert terms["clip"].item() == pytest.approx(clip_loss(s, text, labels, scale).item(), rel=1e-5)
    assert total.item() == pytest.approx(terms["l2"].item() + 0.5 * terms["clip"].item()
                                         + 2.0 * terms["contrastive-image"].item(), rel=1e-6)
    total.backward()
    # the temperatures are learnable
    assert crit.logit_scales["clip"].grad is not None and crit.logit_scales["contrastive_image"].grad is not None
