"""Integrations with training frameworks and model libraries (each needs its extra):

* :mod:`looptrace.integrations.hf` (``pip install "looptrace[hf]"``): per-example losses for Hugging Face
  masked / causal LMs and sequence classifiers, and ``TracInCallback`` for the ``Trainer``;
* :mod:`looptrace.integrations.lightning` (``pip install "looptrace[lightning]"``): ``TracInCallback``
  for Lightning.

Both callbacks write the :class:`looptrace.CheckpointRecorder` format, which
:func:`looptrace.load_checkpoints` and ``looptrace featurize --checkpoint-dir`` read.
"""
