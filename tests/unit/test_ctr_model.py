"""The CTR models on synthetic tasks whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.ctr.din import DIN, CtrConfig, TargetAttention
from models.ctr.features import N_DENSE, CtrBatch, FeatureHasher, Sample, rerank_dense
from models.ctr.logreg import LogReg
from models.ctr.rescorer import CtrRescorer
from models.ctr.train import batch_loss, list_loss, list_losses, logits, optimizers, predict, train_step
from models.ranking import RANK_FEATURES, Candidates
from stream_app.ctr_bench import exact_auc
from tests.unit.ctr_tasks import group_task, list_task


def test_din_learns_target_attention_where_logistic_regression_cannot() -> None:
    torch.manual_seed(0)
    cfg = CtrConfig(buckets=1 << 12, dim=8, hist_len=8)
    fh = FeatureHasher(cfg.buckets, cfg.hist_len)
    train, test = fh.batch(group_task(20_000, 1)), fh.batch(group_task(2_000, 2))
    din, lr = DIN(cfg), LogReg(cfg)
    od, ol = optimizers(din, cfg.lr), optimizers(lr, 0.05)
    losses = []
    for _epoch in range(3):
        for s in range(0, len(train), 256):
            b = train.take(np.arange(s, min(s + 256, len(train))))
            losses.append(train_step(din, od, b))
            train_step(lr, ol, b)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    auc_din, auc_lr = exact_auc(test.label, predict(din, test)), exact_auc(test.label, predict(lr, test))
    assert auc_din > 0.9 and auc_lr < 0.6, (auc_din, auc_lr)


def test_attention_is_the_mlp_of_the_concatenation_with_its_gradients() -> None:
    """The factored first layer is the textbook one, MLP([h, t, h*t, h-t]), values and grads."""
    torch.manual_seed(0)
    att = TargetAttention(8, 32)
    hist = torch.randn(40, 10, 8, requires_grad=True)
    target = torch.randn(40, 8, requires_grad=True)
    mask = torch.rand(40, 10) > 0.3
    mask[0] = False  # an empty history: no weight, zeros out

    t = target.unsqueeze(1).expand_as(hist)
    w = att.mlp(torch.cat([hist, t, hist * t, hist - t], dim=-1)).squeeze(-1).masked_fill(~mask, float("-inf"))
    want = torch.bmm(torch.softmax(w, dim=1).nan_to_num(0.0).unsqueeze(1), hist).squeeze(1)
    got = att(hist, target, mask)
    assert torch.allclose(got, want, atol=1e-6) and not got[0].any()
    wrt = [hist, target, *att.parameters()]
    for a, b in zip(torch.autograd.grad(got.sum(), wrt), torch.autograd.grad(want.sum(), wrt), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_shapes_padding_and_dense_inputs() -> None:
    cfg = CtrConfig(buckets=1 << 10, dim=4, hist_len=5, n_dense=2)
    fh = FeatureHasher(cfg.buckets, cfg.hist_len, n_dense=2)
    s = [Sample("u", "a", "c", (), 1.0, 0, (0.5, 1.0)), Sample("u", "b", None, ("a",) * 9, 0.0, 0)]
    b = fh.batch(s)
    assert b.hist.shape == (2, 5) and (b.hist[0] == 0).all() and (b.hist[1] != 0).all()
    assert b.dense.tolist() == [[0.5, 1.0], [0.0, 0.0]] and b.cat[1] == 0
    p = predict(DIN(cfg), b)
    assert p.shape == (2,) and np.isfinite(p).all()  # an empty history is not a NaN
    assert predict(LogReg(cfg), b).shape == (2,)
    rs = CtrRescorer(DIN(cfg), 1, 1.0, {"x": "c", "z": "c"})
    ctx = [np.zeros((3, RANK_FEATURES), dtype=np.float32), np.zeros((1, RANK_FEATURES), dtype=np.float32)]
    c = Candidates.of_lists(["u", "v"], [["a"], []], [["x", "y", "z"], ["y"]], ctx)
    user, hist, item, cat, dense = (x.numpy() for x in rs.inputs(c))
    assert user.shape == (2,) and user[0] != user[1]
    assert hist.shape == (2, 5) and hist[0, :4].tolist() == [0] * 4 and hist[0, 4] != 0 and not hist[1].any()
    assert item.shape == cat.shape == (2, 3) and item[1, 0] == item[0, 1] and item[1, 1:].tolist() == [0, 0]
    assert cat[0, 0] == cat[0, 2] != 0 and cat[0, 1] == 0 and dense.shape == (2, 3, 2)
    p = rs.score(c)
    assert p.shape == (2, 3) and np.isfinite(p).all() and ((p > 0) & (p < 1)).all()  # P(click): no dense inputs


def test_the_worker_scores_a_chunk_as_the_trainer_scores_its_rows() -> None:
    """``DIN.score_lists`` over a padded chunk is ``DIN.forward`` over the samples the chunk's
    candidates would become: the same buckets, history and dense inputs."""
    torch.manual_seed(1)
    cfg = CtrConfig(buckets=1 << 10, dim=4, hist_len=5, n_dense=N_DENSE)
    din = DIN(cfg)
    with torch.no_grad():
        for w in din.parameters():
            w.normal_(0.0, 0.5)  # far from the initial near-zero weights: every part matters
    cats = {"x": "c1", "z": "c1", "a": "c1", "b": "c2", "q": "c2"}
    rs = CtrRescorer(din, 1, 1.0, cats)
    hists = [["a", "b"], [], ["b", "q", "a", "z", "y", "b", "q"]]
    cands = [["x", "y", "z"], ["y"], ["a", "q", "x", "w"]]
    rng = np.random.default_rng(0)
    ctx = [rng.random((len(cs), RANK_FEATURES)).astype(np.float32) for cs in cands]
    c = Candidates.of_lists(["u", "v", "w"], hists, cands, ctx)
    got = rs.score(c)
    dense = rerank_dense(c, cats)
    rows = [
        Sample(u, it, cats.get(it), tuple(h[-5:]), 0.0, 0, tuple(dense[r, k].tolist()))
        for r, (u, h, cs) in enumerate(zip(c.user_ids, hists, cands, strict=True))
        for k, it in enumerate(cs)
    ]
    want = logits(din, FeatureHasher(cfg.buckets, cfg.hist_len, n_dense=N_DENSE).batch(rows))
    valid = np.arange(4) < c.cnt[:, None]
    assert got[valid] == pytest.approx(want, abs=1e-5) and np.ptp(want) > 1.0
    assert dense[2, :, RANK_FEATURES].tolist() == pytest.approx([2 / 7, 4 / 7, 2 / 7, 0.0])  # c1, c2, c1, none
    assert (dense[:, :, :RANK_FEATURES][valid] == np.concatenate(ctx)).all() and not dense[~valid].any()


def test_sample_objects_round_trip_and_bad_ones_are_refused() -> None:
    s = Sample("u", "i", None, ("a", "b"), 1.0, 5, (0.25,))
    assert Sample.from_obj(s.as_obj()) == s
    g = Sample("u", "i", "c", (), 0.0, 5, (0.5,) * N_DENSE, "u:7")
    assert Sample.from_obj(g.as_obj()) == g and "g" not in s.as_obj()
    for bad in (
        {"u": "u"},
        {**s.as_obj(), "y": 2},
        {**s.as_obj(), "h": "ab"},
        {**s.as_obj(), "d": ["x"]},
        {**s.as_obj(), "g": 3},
    ):
        try:
            Sample.from_obj(bad)
        except (KeyError, TypeError, ValueError):
            continue
        raise AssertionError(f"accepted {bad}")


def test_the_list_loss_is_the_softmax_cross_entropy_of_the_item_taken() -> None:
    z = torch.tensor([2.0, 0.0, -1.0, 0.5, 1.5, 0.3])
    label = np.array([0, 1, 0, 1, 0, 1], dtype=np.float32)
    group = np.array([0, 0, 0, 1, 1, -1])
    b = CtrBatch(**_arrays(label, group))
    ce1, ce2 = torch.logsumexp(z[:3], 0) - z[1], torch.logsumexp(z[3:5], 0) - z[3]
    point = torch.nn.functional.binary_cross_entropy_with_logits(z[5:], torch.ones(1))
    # every row weighs the same: a list of 3 rows counts 3 times, one of 2 twice
    assert float(batch_loss(z, b)) == pytest.approx(float((3 * ce1 + 2 * ce2 + point) / 6), rel=1e-6)
    assert float(list_loss(z[:5], torch.from_numpy(label[:5]), torch.from_numpy(group[:5]))) == pytest.approx(
        float((ce1 + ce2) / 2)
    )
    ce, ranks = list_losses(b, z.double().numpy())
    assert ce.tolist() == pytest.approx(
        [float(torch.logsumexp(z[:3], 0) - z[1]), float(torch.logsumexp(z[3:5], 0) - z[3])]
    )
    assert ranks.tolist() == [1, 1]
    assert float(list_loss(z[:3], torch.zeros(3), torch.zeros(3, dtype=torch.int64))) == 0.0  # no positive: nothing


def _arrays(label: np.ndarray, group: np.ndarray) -> dict[str, np.ndarray]:
    n = len(label)
    z = np.zeros(n, dtype=np.int64)
    return {
        "user": z,
        "item": z,
        "cat": z,
        "hist": np.zeros((n, 2), dtype=np.int64),
        "dense": np.zeros((n, 1), dtype=np.float32),
        "label": label,
        "group": group,
    }


def test_a_reranker_trained_on_list_samples_reorders_candidates_by_what_it_learned() -> None:
    torch.manual_seed(0)
    cfg = CtrConfig(buckets=1 << 12, dim=4, hist_len=5, n_dense=N_DENSE)
    fh = FeatureHasher(cfg.buckets, cfg.hist_len, n_dense=N_DENSE)
    din = DIN(cfg)
    opts = optimizers(din, cfg.lr)
    train = list_task(3000, 1)
    for s in range(0, len(train), 400):
        train_step(din, opts, fh.batch(train[s : s + 400]))
    rs = CtrRescorer(din, 1, 1.0, {})
    assert rs.reranker
    test = list_task(200, 2)
    firsts = 0
    for k in range(0, len(test), 10):
        lst = test[k : k + 10]
        ctx = np.array([s.dense[:RANK_FEATURES] for s in lst], dtype=np.float32)
        (sc,) = rs.score(Candidates.of_lists(["u"], [list(lst[0].history)], [[s.item_id for s in lst]], [ctx]))
        firsts += lst[int(np.argmax(sc))].label == 1.0
    assert firsts >= 150, firsts  # the retrieval order (column 0) gets 1 in 10
