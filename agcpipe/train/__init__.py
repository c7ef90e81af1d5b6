"""The training engine every trainable method uses (see :mod:`.engine`), its checkpoints and loss history.

* :mod:`.engine` -- :class:`~.engine.Engine` (epochs, full-batch or mini-batch, seeds, device, mixed
  precision, early stopping on the training loss, resumable checkpoints, progress bar, loss history),
  :class:`~.engine.TrainPlan` (the resolved generic settings) and :class:`~.engine.LossOutput`.
* :mod:`.checkpoint` -- atomic checkpoints, weight files (safetensors when installed, else ``torch.save``
  loaded with ``weights_only=True``).
* :mod:`.history` -- the ``history.parquet`` table (epoch, component, value).

Import from the submodules; this file imports nothing heavy.
"""
