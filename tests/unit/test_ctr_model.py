"""The CTR models on synthetic tasks whose answer is known."""

from __future__ import annotations

import numpy as np
import torch

from models.ctr.din import DIN, CtrConfig
from models.ctr.features import FeatureHasher, Sample
from models.ctr.logreg import LogReg
from models.ctr.rescorer import CtrRescorer
from models.ctr.train import optimizers, predict, train_step
from stream_app.ctr_bench import exact_auc
from tests.unit.ctr_tasks import group_task


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


def test_shapes_padding_and_dense_inputs() -> None:
    cfg = CtrConfig(buckets=1 << 10, dim=4, hist_len=5, n_dense=2)
    fh = FeatureHasher(cfg.buckets, cfg.hist_len, n_dense=2)
    s = [Sample("u", "a", "c", (), 1.0, 0, (0.5, 1.0)), Sample("u", "b", None, ("a",) * 9, 0.0, 0)]
    b = fh.batch(s)
    assert b.hist.shape == (2, 5) and (b.hist[0] == 0).all() and (b.hist[1] != 0).all()
    assert b.dense.tolist() == [[0.5, 1.0], [0.0, 0.0]] and b.cat[1] == 0
    p = predict(DIN(cfg), b)
    assert p.shape == (2,) and np.isfinite(p).all()  # an empty history is not a NaN
    rs = CtrRescorer(DIN(cfg), 1, 1.0, {"x": "c", "z": "c"})
    c = rs.batch(["u", "v"], [["a"], []], [["x", "y", "z"], ["y"]])
    assert len(c) == 4 and c.user[2] == c.user[0] != c.user[3] and c.cat[1] == 0 and (c.hist[3] == 0).all()
    assert predict(LogReg(cfg), c).shape == (4,) and [len(x) for x in rs.score(["u"], [["a"]], [["x", "y"]])] == [2]


def test_sample_objects_round_trip_and_bad_ones_are_refused() -> None:
    s = Sample("u", "i", None, ("a", "b"), 1.0, 5, (0.25,))
    assert Sample.from_obj(s.as_obj()) == s
    for bad in ({"u": "u"}, {**s.as_obj(), "y": 2}, {**s.as_obj(), "h": "ab"}, {**s.as_obj(), "d": ["x"]}):
        try:
            Sample.from_obj(bad)
        except (KeyError, TypeError, ValueError):
            continue
        raise AssertionError(f"accepted {bad}")
