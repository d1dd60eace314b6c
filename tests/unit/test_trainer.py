"""The trainer's batch logic without Kafka: progressive metrics, the gate, checkpoints, drift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.ctr.checkpoint import from_bytes
from models.ctr.features import Sample
from models.ctr.train import predict
from stream_app.config import Settings
from stream_app.ctr_bench import exact_auc
from stream_app.errors import UsageError
from stream_app.trainer import Trainer
from tests.unit.ctr_tasks import group_task, list_task


def _settings(tmp: Path, **kw: object) -> Settings:
    base: dict[str, object] = {"model_dir": tmp, "ctr_buckets": 4096, "ctr_dim": 8, "ctr_hist_len": 8, "ctr_lr": 0.01}
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


def _feed(t: Trainer, samples: list[Sample], size: int = 256) -> None:
    for s in range(0, len(samples), size):
        t.step(samples[s : s + size])


def test_progressive_auc_beats_logistic_regression_and_versions_survive_a_restart(tmp_path: Path) -> None:
    t = Trainer(_settings(tmp_path, ctr_publish_batches=20))
    _feed(t, group_task(50_000, 1))
    m = t.metrics()
    assert m["ctr"]["auc"] > 0.9 and m["logreg"]["auc"] < 0.6, m  # AUC over the last 20,000 samples
    assert 0 < m["samples"] < 50_000  # the held-back share was not trained on
    assert t.version >= 2 and len(list(tmp_path.glob("ctr-*.pt"))) == min(t.version, 5)
    again = Trainer(_settings(tmp_path))
    assert again.version == t.version and again.live is not None and t.live is not None
    for a, b in zip(again.model.state_dict().values(), t.live.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_gate_rolls_back_a_candidate_that_does_worse(tmp_path: Path) -> None:
    t = Trainer(_settings(tmp_path, ctr_publish_batches=10_000))
    _feed(t, group_task(40_000, 2))
    assert t.gate() and t.version == 1  # with no live version, the first gate publishes at once
    _feed(t, group_task(5_000, 6))
    assert t.gate() and t.version == 2  # still learning the same task: no worse, published
    good = {k: v.clone() for k, v in t.model.state_dict().items()}
    with torch.no_grad():
        for p in t.model.mlp.parameters():
            p.mul_(-1.0)  # a damaged candidate
    assert not t.gate() and t.version == 2 and t.rejected == 1
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, good[k])  # back to the live weights


def test_a_preference_shift_is_detected_and_boosts_learning(tmp_path: Path) -> None:
    t = Trainer(_settings(tmp_path, ctr_drift_batches=30))
    _feed(t, group_task(40_000, 3))
    assert t.drifts == 0, t.metrics()  # learning (a falling loss) is not drift
    _feed(t, group_task(12_000, 4, flip=True))
    assert t.drifts >= 1 and t.boosted_batches > 0  # learned faster for a while
    after_flip = t.progress.recent
    _feed(t, group_task(30_000, 5, flip=True))
    # it has learned the new preferences: its loss kept falling, and it ranks fresh samples of
    # the flipped task well (AUC 0.5 would be chance, and the old preferences score 0)
    assert t.progress.recent < after_flip
    fresh = group_task(5_000, 7, flip=True)
    b = t.hasher.batch(fresh)
    assert exact_auc(b.label, predict(t.model, b)) > 0.8


def test_list_samples_train_the_reranker_beside_the_click_task_and_pass_the_gate(tmp_path: Path) -> None:
    t = Trainer(_settings(tmp_path, ctr_publish_batches=10_000, ctr_publish_interval_s=3600))
    points, lists = group_task(48_000, 8), list_task(2_400, 9)
    _feed(t, [s for k in range(0, 48_000, 1000) for s in points[k : k + 1000] + lists[k // 2 : k // 2 + 500]])
    m = t.metrics()
    assert m["lists"]["lists"] > 2_000 and m["lists"]["first"] > 0.5, m
    assert abs(m["lists"]["first_retrieval"] - 0.1) < 0.03, m  # the served order is noise by construction
    assert m["ctr"]["auc"] > 0.85 and m["logreg"]["auc"] < 0.6, m  # the click task, on ungrouped samples
    assert t.gate() and t.version == 1
    # lists are held back whole (by user and time), so the gate can weigh the list task too
    held = t.hasher.batch(list(t.holdout))
    assert held.group is not None
    g = held.group[held.group >= 0]
    assert np.bincount(g, weights=held.label[held.group >= 0]).tolist() == [1.0] * (int(g.max()) + 1)
    assert np.bincount(g).min() == 10


def test_a_published_checkpoint_scores_the_same_where_workers_load_it(tmp_path: Path) -> None:
    # trained on STREAMREC_CTR_DEVICE (the CPU unless set): a worker loads it on its CPU
    t = Trainer(_settings(tmp_path, ctr_publish_batches=10_000))
    _feed(t, group_task(20_000, 10))
    assert t.gate() and t.version == 1
    version, loaded = from_bytes(next(tmp_path.glob("ctr-*.pt")).read_bytes())
    assert version == 1 and loaded.emb.weight.device.type == "cpu"
    b = t.hasher.batch(group_task(2_000, 11))
    p = predict(loaded, b)
    assert np.allclose(p, predict(t.model, b), atol=1e-5) and p.std() > 0.05  # a trained model, not a constant


def test_a_gpu_that_torch_cannot_use_is_a_clear_error(tmp_path: Path) -> None:
    beyond = f"cuda:{torch.cuda.device_count()}"  # no such GPU on any machine
    said = rf"STREAMREC_CTR_DEVICE={beyond}, but torch (\S+ )?sees (no CUDA GPU|\d+ GPU)"
    with pytest.raises(UsageError, match=said):
        Trainer(_settings(tmp_path, ctr_device=beyond))
