"""A small PyTorch click-through-rate model that keeps learning from the stream.

``features`` turns samples into fixed-shape integer batches (hashed ids, so the model never
grows), ``din`` is the DIN-style model (target attention over the user's recent items),
``logreg`` the logistic-regression baseline on the same features, and ``train`` holds the plain
``train_step`` and ``predict`` functions. Nothing here does IO.

The package itself imports nothing: workers use ``samples`` and ``features`` without loading
torch (importing it costs a worker about 190 MB and, measured, half its throughput).
"""
