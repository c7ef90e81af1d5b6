"""Typed run configuration.

A run is described by one YAML file validated against :class:`Config`. Unknown keys are errors (with a
"did you mean" hint), values are type-checked, ``${VAR}`` / ``${VAR:-default}`` in strings expand from the
environment, and ``--set a.b=value`` overrides (value parsed as YAML) apply before validation. Method
parameters are validated against the parameter model of the method's registry entry.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- sources
class PlanetoidSource(Strict):
    """Planetoid raw split files (``ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}``)."""

    type: Literal["planetoid"]
    name: str = Field(description="Cora, CiteSeer or PubMed (case-insensitive)")
    root: str | None = Field(
        None, description="folder holding <Name>/raw; default <datasets_root>/planetoid"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        canon = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
        if v.lower() not in canon:
            raise ValueError(f"unknown Planetoid dataset {v!r}; known: {sorted(canon.values())}")
        return canon[v.lower()]


class NpzSource(Strict):
    """An ``.npz`` graph file: pickle-free (tolokers / gnn-benchmark layouts) or GraphData (pickled scipy)."""

    type: Literal["npz"]
    path: str = Field(description="absolute, or relative to datasets_root")
    trust_pickle: bool = Field(
        False,
        description="allow unpickling (GraphData layout); pickles run code, so only for trusted files",
    )


class TableSource(Strict):
    """User tables: an edges table and a nodes table, Parquet or CSV (a file, a folder or a glob)."""

    type: Literal["tables"]
    edges: str
    nodes: str
    format: Literal["auto", "parquet", "csv"] = "auto"
    source_column: str = "source"
    target_column: str = "target"
    weight_column: str | None = None
    id_column: str = "id"
    features: str | list[str] | None = Field(
        None,
        description="one list column name, a list of numeric column names, or a glob such as 'f_*'; "
        "None = every numeric column except id and label",
    )
    label_column: str | None = None


class SyntheticSource(Strict):
    """Attributed stochastic block model, generated in chunks (10M nodes fit the memory budget)."""

    type: Literal["synthetic"]
    n_nodes: int = Field(20_000, ge=2)
    n_communities: int = Field(10, ge=1)
    avg_degree: float = Field(10.0, gt=0)
    within_between: float = Field(
        20.0, gt=0, description="ratio p_in / p_out of the SBM edge probabilities"
    )
    n_features: int = Field(64, ge=1)
    feature_signal: float = Field(
        1.0, ge=0, description="distance of community feature means, in units of the noise std"
    )
    seed: int = Field(0, ge=0)
    chunk_nodes: int = Field(1_000_000, ge=1, description="nodes generated per chunk")


Source = Annotated[
    Union[PlanetoidSource, NpzSource, TableSource, SyntheticSource], Field(discriminator="type")
]
#: validates a bare source mapping (``{"type": "tables", ...}``) outside a full config
TypeAdapterSource: TypeAdapter = TypeAdapter(Source)


# ------------------------------------------------------------------------------------------ stages
class GraphOptions(Strict):
    undirected: bool = Field(True, description="symmetrise: every edge also in reverse")
    merge_duplicates: bool = True
    duplicate_weight: Literal["max", "sum", "first"] = "max"
    drop_self_loops: bool = True
    reorder: Literal["none", "rcm", "degree", "community"] = Field(
        "none",
        description="node order of the canonical graph, computed once at ingest for locality of the sparse "
        "products: none (input order), rcm (reverse Cuthill-McKee), degree (descending), community "
        "(recursive bisection of smoothed random projections: nodes of one community become neighbours). "
        "The permutation is stored (order.npy); keys, labels and outputs keep the user's ids",
    )


class FeatureOptions(Strict):
    preprocess: Literal["l1", "standardize", "none"] = Field(
        "none", description="l1 = row L1 normalisation (the published bag-of-words protocol)"
    )


class MethodConfig(Strict):
    name: str = "ssgc"
    params: dict[str, Any] = Field(default_factory=dict)


class ClusterConfig(Strict):
    n_clusters: int | None = Field(None, ge=2, description="None = number of label classes")
    n_init: int = Field(10, ge=1)
    max_iter: int = Field(300, ge=1)
    tol: float = Field(1e-4, ge=0)
    normalize: bool = Field(True, description="L2-normalise embeddings before KMeans")
    chunk_size: int = Field(65_536, ge=1)
    init_sample: int | None = Field(
        None,
        ge=2,
        description="run k-means++ on this many uniformly drawn rows when there are more nodes (None: on all "
        "rows, as scikit-learn); Lloyd's iterations always use every row",
    )


_DASK_ADDRESS_RE = re.compile(r"^(tcp|tls|inproc|ucx|ws|wss)://\S+$")


class DaskConfig(Strict):
    """Dask (``dask.distributed``) for the blocked stages: precompute hops, KMeans steps, evaluation.

    ``enabled: true`` with an ``address`` (``tcp://host:8786``), or else with the environment variable
    ``DASK_SCHEDULER_ADDRESS`` set (``agcpipe infra up`` exports it), uses that existing scheduler; with
    neither it starts a local cluster (``n_workers`` processes on loopback) for the run. Workers must see the store's folder at the same path (one machine, or a shared
    filesystem): tasks exchange file paths, never arrays. Results equal the single-process ones (float32
    tolerance), so the Dask settings are not part of any cache key.
    """

    enabled: bool = Field(False, description="run the blocked stages on dask.distributed")
    address: str | None = Field(
        None,
        description="scheduler address (tcp://host:port) of an existing cluster; None = DASK_SCHEDULER_ADDRESS "
        "if set, else a local cluster",
    )
    n_workers: int = Field(2, ge=1, le=1024, description="local cluster: worker processes")
    threads_per_worker: int = Field(1, ge=1, le=256, description="local cluster: threads per worker")
    memory_limit: str = Field(
        "auto", description="local cluster: memory limit per worker ('auto' = RAM / n_workers, '4GiB', '0' = none)"
    )
    tasks_per_worker: int = Field(2, ge=1, le=64, description="row blocks per worker and step (load balance)")
    task_runner: bool = Field(
        False,
        description="run the flow's stages as tasks of Prefect's DaskTaskRunner on this cluster "
        "(needs a Prefect server: PREFECT_API_URL)",
    )

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        v = v.strip()
        if not _DASK_ADDRESS_RE.match(v):
            raise ValueError(
                f"dask.address must be a scheduler address like tcp://127.0.0.1:8786, got {v!r}"
            )
        return v

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str) -> str:
        if v in ("auto", "0"):
            return v
        from dask.utils import parse_bytes

        try:
            if parse_bytes(v) <= 0:
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(f"dask.memory_limit must be 'auto', '0' or a size like '4GiB', got {v!r}") from None
        return v

    @model_validator(mode="after")
    def _runner(self) -> "DaskConfig":
        if self.task_runner and not self.enabled:
            raise ValueError("dask.task_runner needs dask.enabled: true")
        return self


class TrainConfig(Strict):
    """How trainable methods train (generic); *what* they train (encoder, loss, lr, epochs) is ``method.params``.

    Settings left at ``None`` take the method's published default. The settings that can change the trained
    weights (resolved mode, batch size, fan-out, epochs, early stopping, amp) are part of the train stage's
    cache key; checkpointing, logging and the progress bar are not.
    """

    mode: Literal["auto", "full", "minibatch"] = Field(
        "auto", description="auto = full-batch up to max_full_batch_nodes nodes, else mini-batch"
    )
    max_full_batch_nodes: int = Field(
        200_000, ge=1, description="auto mode and inference: full-graph passes up to this many nodes"
    )
    batch_size: int | None = Field(None, ge=1, description="seed nodes per mini-batch; None = the method's default")
    fanout: list[int] | None = Field(
        None,
        description="neighbours sampled per node at each layer (-1 = all), outermost layer first; "
        "None = the method's default; an MLP encoder samples nothing (node batches)",
    )
    epochs: int | None = Field(None, ge=1, description="overrides the method's number of epochs")
    patience: int | None = Field(
        None, ge=0, description="early stopping on the training loss: epochs without improvement; 0 = off; None = method default"
    )
    min_delta: float = Field(0.0, ge=0, description="smallest loss decrease that counts as an improvement")
    restore_best: bool = Field(True, description="with early stopping, keep the weights of the best epoch")
    amp: bool = Field(False, description="mixed precision (bfloat16 on CPU, float16 + loss scaling on CUDA)")
    checkpoint_every: int = Field(10, ge=0, description="epochs between checkpoints (0 = never)")
    checkpoint_seconds: float = Field(300.0, ge=0, description="also checkpoint at an epoch end after this many seconds")
    log_every: int = Field(1, ge=1, description="record the loss history every N epochs")
    progress: bool = Field(True, description="progress bar (loss, speed) on a terminal for runs longer than a few seconds")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads while training (None = torch's default, all cores)"
    )

    @field_validator("fanout")
    @classmethod
    def _fanout(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(k == 0 or k < -1 for k in v):
            raise ValueError(f"fanout entries must be positive or -1 (all neighbours), got {v}")
        return v


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
#: '<metric> <op> <number>', or '<metric> <op> champion [(+|-|*) <number>]' where ``champion`` is the
#: value of the same metric on the version the alias (tracking.alias) points at now (its metric.<name>
#: tag). Groups: 1 metric, 2 op, 3 number (absolute form), 4 / 5 operator / operand after champion.
_GATE_RE = re.compile(
    rf"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|>|<|==)\s*(?:({_NUM})|champion(?:\s*([-+*])\s*({_NUM}))?)\s*$"
)


class TrackingConfig(Strict):
    enabled: bool = True
    tracking_uri: str | None = None
    artifact_root: str | None = None
    experiment: str = "agcpipe"
    model_name: str | None = Field(None, description="registered model name; default agcpipe-<name>")
    register_model: bool = True
    alias: str = "champion"
    gate: list[str] = Field(
        default_factory=list,
        description="conditions on metrics, e.g. 'modularity >= 0.5' or 'nmi >= champion - 0.01' "
        "(champion = the alias's current holder)",
    )

    @field_validator("gate")
    @classmethod
    def _gate(cls, v: list[str]) -> list[str]:
        for cond in v:
            if not _GATE_RE.match(cond):
                raise ValueError(
                    f"gate condition {cond!r} is not of the form '<metric> <op> <number>' or "
                    "'<metric> <op> champion [+|-|* <number>]' with op one of >=, <=, >, <, =="
                )
        return v


class Config(Strict):
    name: str = "default"
    seed: int = 0
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    store: str | None = None
    datasets_root: str | None = None
    source: Source = Field(default_factory=lambda: SyntheticSource(type="synthetic"))
    graph: GraphOptions = Field(default_factory=GraphOptions)
    features: FeatureOptions = Field(default_factory=FeatureOptions)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    dask: DaskConfig = Field(default_factory=DaskConfig)
    #: directory of the YAML file (relative table paths resolve against it); not a user key
    base_dir: str | None = Field(None, exclude=True)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {v!r}")
        return v

    @model_validator(mode="after")
    def _method(self) -> "Config":
        from .methods import registry

        entry = registry.get(self.method.name)  # raises ConfigError listing the known methods
        self.method.params = entry.validate_params(self.method.params)
        return self

    @property
    def model_name(self) -> str:
        return self.tracking.model_name or f"agcpipe-{self.name}"

    def resolved(self) -> dict[str, Any]:
        """The config as plain data with every default filled in (what MLflow logs as params)."""
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------------------ loading
#: the built-in default job (``agcpipe run`` with no config)
DEFAULT_CONFIG = Path(__file__).parent / "defaults" / "default.yaml"

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"config refers to ${{{name}}} but the environment variable {name} is not set"
            )

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set has an empty key in {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> Config:
    """Load, override and validate a config. ``path=None`` gives the built-in default job."""
    base_dir = None
    if data is None:
        if path is None:
            data = yaml.safe_load(DEFAULT_CONFIG.read_text())
        else:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            try:
                loaded = yaml.safe_load(p.read_text())
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: not valid YAML: {e}") from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{p}: the top level must be a mapping of keys, not {type(loaded).__name__}")
            data = loaded
            base_dir = str(p.resolve().parent)
    else:
        data = dict(data)
    if "source" not in data:  # no source at all: the built-in synthetic graph (overrides may refine it)
        data["source"] = {"type": "synthetic"}
    data = apply_overrides(_deepcopy(data), overrides or [])
    data = _expand_env(data)
    if base_dir and "base_dir" not in data:
        data["base_dir"] = base_dir
    return validate_config(data, source=str(path) if path else "config")


def validate_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _format_validation(e: ValidationError, source: str) -> str:
    msgs = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            hint = _did_you_mean(key, _known_keys(err["loc"][:-1]))
            msgs.append(f"unknown config key '{loc}'{hint}")
        elif err["type"] == "union_tag_invalid":
            tag = err["input"].get("type") if isinstance(err["input"], dict) else err["input"]
            msgs.append(f"{loc}: unknown source type {tag!r}; known: planetoid, npz, tables, synthetic")
        elif err["type"] == "union_tag_not_found":
            msgs.append(f"{loc}: missing key '{loc}.type'; one of planetoid, npz, tables, synthetic")
        elif err["type"] == "missing":
            msgs.append(f"missing config key '{loc}'")
        elif err["type"] == "value_error" and isinstance(err.get("ctx", {}).get("error"), ConfigError):
            msgs.append(str(err["ctx"]["error"]))
        else:
            msgs.append(f"{loc or 'config'}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(msgs)


def _is_union_tag(x: Any) -> bool:
    return x in ("planetoid", "npz", "tables", "synthetic")


def _known_keys(loc: tuple) -> list[str]:
    tags = {"planetoid": PlanetoidSource, "npz": NpzSource, "tables": TableSource, "synthetic": SyntheticSource}
    model: Any = Config
    for part in loc:
        if part in tags:
            model = tags[part]
            continue
        field = getattr(model, "model_fields", {}).get(part) if model is not None else None
        if field is None:
            return []
        ann = field.annotation
        # a discriminated union (source) is resolved by the tag that follows it in ``loc``
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return [k for k in getattr(model, "model_fields", {}) if k != "base_dir"]


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    if known:
        return f" (known keys: {', '.join(known)})"
    return ""
