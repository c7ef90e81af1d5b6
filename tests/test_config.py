"""Config loading: defaults, overrides, environment, and the error for every kind of bad key."""
from __future__ import annotations

import pytest

from agcpipe.config import load_config
from agcpipe.errors import ConfigError


def test_default_job_is_synthetic_ssgc():
    cfg = load_config()
    assert cfg.source.type == "synthetic" and cfg.source.n_nodes == 20000 and cfg.source.n_communities == 10
    assert cfg.method.name == "ssgc" and cfg.method.params == {"K": 8, "alpha": 0.05}
    assert cfg.cluster.n_clusters == 10


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["method.name=ppr", "method.params={alpha: 0.2}", "cluster.normalize=false", "tracking.gate=['nmi >= 0.3']"])
    assert cfg.method.name == "ppr" and cfg.method.params == {"alpha": 0.2, "K": 10}
    assert cfg.cluster.normalize is False and cfg.tracking.gate == ["nmi >= 0.3"]


def test_file_env_and_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_ROOT", "/data/x")
    p = tmp_path / "c.yaml"
    p.write_text("name: t\ndatasets_root: ${MY_ROOT}\nstore: ${NOPE:-/tmp/s}\nsource: {type: planetoid, name: cora}\n")
    cfg = load_config(p)
    assert cfg.datasets_root == "/data/x" and cfg.store == "/tmp/s"
    assert cfg.source.name == "Cora" and cfg.base_dir == str(tmp_path)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["cluster.n_clusterz=3"], ["unknown config key 'cluster.n_clusterz'", "did you mean 'n_clusters'"]),
        (["zzz=red"], ["unknown config key 'zzz'", "known keys"]),
        (["source.n_nodez=5"], ["source.n_nodez", "did you mean 'n_nodes'"]),
        (["method.name=dmon2"], ["unknown method 'dmon2'", "known methods:", "ssgc"]),
        (["method.params.KK=3"], ["unknown parameter 'method.params.KK'", "known: K, alpha"]),
        (["method.params.alpha=2"], ["method.params.alpha", "less than or equal to 1"]),
        (["cluster.n_clusters=1"], ["cluster.n_clusters", "greater than or equal to 2"]),
        (["source.type=hdfs"], ["unknown source type 'hdfs'"]),
        (["tracking.gate=['nmi >> 2']"], ["gate condition 'nmi >> 2'"]),
        (["device=tpu"], ["device must be auto, cpu, cuda or cuda:N"]),
        (["store=${UNSET_AGCPIPE_VAR}"], ["UNSET_AGCPIPE_VAR is not set"]),
        (["novalue"], ["--set expects key=value"]),
    ],
)
def test_bad_config_errors_name_the_problem(overrides, fragments):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    for f in fragments:
        assert f in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("source: {name: Cora}\n")
    with pytest.raises(ConfigError, match="source.type"):
        load_config(bad)
