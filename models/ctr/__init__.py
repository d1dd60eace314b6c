"""A small PyTorch click-through-rate model that keeps learning from the stream.

``features`` turns samples into fixed-shape integer batches (hashed ids, so the model never
grows), ``din`` is the DIN-style model (target attention over the user's recent items),
``logreg`` the logistic-regression baseline on the same features, and ``train`` holds the plain
``train_step`` and ``predict`` functions. Nothing here does IO.
"""

from models.ctr.din import DIN, CtrConfig
from models.ctr.features import CtrBatch, FeatureHasher, Sample
from models.ctr.logreg import LogReg
from models.ctr.train import predict, train_step

__all__ = ["DIN", "CtrBatch", "CtrConfig", "FeatureHasher", "LogReg", "Sample", "predict", "train_step"]
