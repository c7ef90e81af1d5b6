"""MLflow pyfunc wrapper of :class:`agcpipe.model.ModelBundle` (logged as "models from code").

``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(source)`` clusters the graph ``source``:
a source mapping (``{"type": "tables", "edges": ..., "nodes": ...}``, any ingest source), a
one-row DataFrame holding such a mapping's fields, or the path of a canonical graph folder. It returns a
DataFrame (key, node_id, cluster, confidence). ``params`` may carry ``datasets_root``, ``base_dir`` and
``device``.
"""
from __future__ import annotations

from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.models.signature import ModelSignature
from mlflow.types import ParamSchema, ParamSpec

#: no input schema (the input is a graph source); inference-time params with their defaults
SIGNATURE = ModelSignature(
    inputs=None,
    params=ParamSchema(
        [
            ParamSpec("datasets_root", "string", ""),
            ParamSpec("base_dir", "string", ""),
            ParamSpec("device", "string", "auto"),
        ]
    ),
)


class AgcPyfuncModel(mlflow.pyfunc.PythonModel):
    # The input is a graph source (a mapping or a path), which no MLflow signature describes: skip
    # type-hint validation (MLflow's own switch for this; otherwise it warns at class creation).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from agcpipe.model import ModelBundle

        self.bundle = ModelBundle(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        params = {k: v for k, v in (params or {}).items() if v not in (None, "")}
        table = self.bundle.assign(
            _as_source(model_input),
            datasets_root=params.get("datasets_root"),
            base_dir=params.get("base_dir"),
            device=params.get("device", "auto"),
        )
        return table.to_pandas()


def _as_source(model_input: Any) -> Any:
    """A one-row DataFrame (how some MLflow clients send a mapping) becomes the mapping it holds."""
    import pandas as pd

    from agcpipe.errors import ConfigError

    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise ConfigError("a DataFrame input must hold exactly one row: the fields of one graph source")
        row = model_input.iloc[0].to_dict()
        return {k: v for k, v in row.items() if v is not None and v == v}  # drop empty (NaN) cells
    return model_input


mlflow.models.set_model(AgcPyfuncModel())
