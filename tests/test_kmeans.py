"""agcpipe.cluster.kmeans.KMeans: same results as scikit-learn's Lloyd, chunking, memmaps, validation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans as SkKMeans
from threadpoolctl import threadpool_limits

from agcpipe.cluster.kmeans import KMeans, _same_partition, _Workspace
from agcpipe.errors import ConfigError, StageError


def _mixture(n: int, d: int, k: int, spread: float, std: float, seed: int) -> np.ndarray:
    """Gaussian mixture: k centres uniform in [-spread, spread]^d, unequal cluster sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-spread, spread, size=(k, d))
    sizes = rng.multinomial(n, rng.dirichlet(np.full(k, 3.0)))
    x = np.concatenate([c + std * rng.standard_normal((m, d)) for c, m in zip(centres, sizes)])
    return rng.permutation(x).astype(np.float32)


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    return _mixture(3000, 16, 8, spread=10.0, std=1.0, seed=0)


@pytest.fixture(scope="module")
def overlapping() -> np.ndarray:
    return _mixture(4000, 8, 12, spread=2.0, std=1.0, seed=1)


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _sklearn(x: np.ndarray, k: int, **kw) -> SkKMeans:
    with threadpool_limits(1):  # OpenMP teams crawl on a shared 2-core machine
        return SkKMeans(k, algorithm="lloyd", **kw).fit(x)


def _exact_inertia(x: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> float:
    return float(((x.astype(np.float64) - centres.astype(np.float64)[labels]) ** 2).sum())


def _fixed_init(monkeypatch: pytest.MonkeyPatch, km: KMeans, centres: np.ndarray) -> KMeans:
    """Make every restart of ``km`` start from ``centres`` (to compare Lloyd runs with sklearn's)."""
    monkeypatch.setattr(km, "_init_centers", lambda *a: torch.from_numpy(centres.astype(np.float32)))
    return km


# ---------------------------------------------------------------------- agreement with sklearn
@pytest.mark.parametrize("data", ["blobs", "overlapping"])
def test_inertia_within_one_percent_of_sklearn(data: str, request: pytest.FixtureRequest) -> None:
    x = request.getfixturevalue(data)
    k = 8 if data == "blobs" else 12
    km = KMeans(k, n_init=10, max_iter=300, seed=0, device="cpu").fit(x)
    sk = _sklearn(x, k, n_init=10, max_iter=300, random_state=0)
    assert abs(km.inertia_ - sk.inertia_) <= 0.01 * sk.inertia_
    assert km.inertia_ == pytest.approx(_exact_inertia(x, km.labels_, km.cluster_centers_), rel=1e-6)
    assert km.labels_.dtype == np.int64 and km.labels_.shape == (len(x),)
    assert km.cluster_centers_.dtype == np.float32 and km.cluster_centers_.shape == (k, x.shape[1])
    assert 0 <= km.best_init_ < 10 and 1 <= km.n_iter_ <= 300


def test_cora_normalized_within_one_percent_of_sklearn(datasets: Path) -> None:
    from torch_geometric.io import read_planetoid_data

    raw = datasets / "planetoid" / "Cora" / "raw"
    feats = read_planetoid_data(str(raw), "cora").x.numpy().astype(np.float32)
    feats /= feats.sum(1, keepdims=True)  # L1-normalised bag of words
    km = KMeans(7, n_init=10, max_iter=300, normalize=True, seed=0, device="cpu").fit(feats)
    sk = _sklearn(_l2(feats), 7, n_init=10, max_iter=300, random_state=0)
    assert abs(km.inertia_ - sk.inertia_) <= 0.01 * sk.inertia_
    # centres and inertia live in the normalised space
    assert km.inertia_ == pytest.approx(_exact_inertia(_l2(feats), km.labels_, km.cluster_centers_), rel=1e-5)


@pytest.mark.parametrize(("tol", "chunk_size", "seed"), [(1e-4, 65536, 3), (0.0, 65536, 4), (0.0, 50, 5)])
def test_lloyd_from_same_init_matches_sklearn(tol: float, chunk_size: int, seed: int, overlapping, monkeypatch) -> None:
    """Same initial centres -> same Lloyd iterates (the bounds only skip work): labels, centres, iterations."""
    x = overlapping
    init = x[np.random.default_rng(seed).choice(len(x), 12, replace=False)]
    km = _fixed_init(monkeypatch, KMeans(12, n_init=1, tol=tol, chunk_size=chunk_size, device="cpu"), init).fit(x)
    sk = _sklearn(x, 12, n_init=1, tol=tol, init=init)
    assert km.n_iter_ == sk.n_iter_
    assert (km.labels_ != sk.labels_).mean() < 1e-3  # float32 ties aside
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-4)
    assert km.inertia_ == pytest.approx(sk.inertia_, rel=1e-5)


def test_empty_cluster_relocated_to_farthest_point(monkeypatch) -> None:
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 0.5, (60, 2)), rng.normal(8, 0.5, (60, 2)), [[30.0, 30.0]]]).astype(np.float32)
    init = np.array([[0.0, 0.0], [8.0, 8.0], [-500.0, -500.0]], np.float32)  # the third centre gets no point
    km = _fixed_init(monkeypatch, KMeans(3, n_init=1, device="cpu"), init).fit(x)
    sk = _sklearn(x, 3, n_init=1, init=init)
    assert np.bincount(km.labels_, minlength=3).min() > 0
    # the empty cluster took the outlier, the point farthest from its centre
    np.testing.assert_allclose(km.cluster_centers_[2], [30.0, 30.0])
    np.testing.assert_array_equal(km.labels_, sk.labels_)
    np.testing.assert_allclose(km.cluster_centers_, sk.cluster_centers_, atol=1e-5)


def test_same_partition_is_label_permutation_invariant() -> None:
    a = torch.tensor([0, 0, 1, 2, 2])
    assert _same_partition(a, torch.tensor([2, 2, 0, 1, 1]), 3)
    assert not _same_partition(a, torch.tensor([2, 1, 0, 1, 1]), 3)
    assert not _same_partition(a, torch.tensor([2, 2, 0, 0, 1]), 3)


def test_more_clusters_than_distinct_points() -> None:
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]], np.float32), 10, axis=0)
    km = KMeans(4, n_init=2, seed=0, device="cpu").fit(x)
    assert km.inertia_ == 0.0
    assert len(np.unique(km.labels_)) == 3
    assert np.isfinite(km.cluster_centers_).all()


def _seeded_centres(km: KMeans, x: np.ndarray, draws: int = 5) -> list[np.ndarray]:
    """``draws`` successive centre seedings of ``km`` (its ``n_clusters``) on ``x``, from one generator."""
    Xt, xnorm2, _ = km._materialise(x, *x.shape)
    ws = _Workspace(len(x), 16, km.n_clusters, 4096, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    return [km._init_centers(Xt, xnorm2, km.n_clusters, gen, ws).numpy() for _ in range(draws)]


def _potential(x: np.ndarray, centres: list[np.ndarray]) -> float:
    """The k-means cost of ``x`` against each seeding, summed over the seedings."""
    return float(sum(((x[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum() for c in centres))


def test_init_picks_distinct_rows_and_kmeans_plusplus_spreads_them(blobs: np.ndarray) -> None:
    potential: dict[str, float] = {}
    rows = {tuple(r) for r in blobs.tolist()}
    for init in ("k-means++", "random"):
        centres = _seeded_centres(KMeans(8, init=init, device="cpu"), blobs)
        for c in centres:
            assert len({tuple(r) for r in c.tolist()}) == 8 and all(tuple(r) in rows for r in c.tolist())
        potential[init] = _potential(blobs, centres)
    # on well-separated blobs k-means++ seeds (nearly) every blob; random rows often miss some
    assert potential["k-means++"] < 0.5 * potential["random"]


@pytest.mark.parametrize("normalize", [False, True])
def test_sampled_init_runs_kmeans_plusplus_on_the_sample_only(normalize: bool, blobs: np.ndarray, monkeypatch) -> None:
    seen: list[tuple[int, float]] = []
    real = KMeans._kmeans_pp

    def spy(self, X, xnorm2, k, gen, ws):
        seen.append((X.shape[0], float(xnorm2.max())))
        return real(self, X, xnorm2, k, gen, ws)

    monkeypatch.setattr(KMeans, "_kmeans_pp", spy)
    x = blobs * 3.0  # rows far from unit length: the sample must be normalised as X is
    full = KMeans(8, n_init=2, seed=3, normalize=normalize, device="cpu").fit(x)
    sampled = KMeans(8, n_init=2, seed=3, normalize=normalize, init_sample=500, device="cpu").fit(x)
    assert [m for m, _ in seen] == [len(x)] * 2 + [500] * 2
    if normalize:
        assert all(abs(top - 1.0) < 1e-4 for _, top in seen)
    # the centres it seeds are rows of X (normalised when asked), and Lloyd still runs on every row:
    # on separated blobs both reach the same partition
    assert _same_partition(torch.from_numpy(full.labels_), torch.from_numpy(sampled.labels_), 8)
    assert sampled.labels_.shape == (len(x),)


def test_sampled_init_is_seeded_and_skipped_when_the_sample_covers_x(overlapping: np.ndarray) -> None:
    a = KMeans(12, n_init=2, seed=5, init_sample=600, device="cpu").fit(overlapping)
    b = KMeans(12, n_init=2, seed=5, init_sample=600, device="cpu").fit(overlapping)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    exact = KMeans(12, n_init=2, seed=5, device="cpu").fit(overlapping)
    covered = KMeans(12, n_init=2, seed=5, init_sample=len(overlapping), device="cpu").fit(overlapping)
    np.testing.assert_array_equal(exact.cluster_centers_, covered.cluster_centers_)


def test_sampled_kmeans_plusplus_still_spreads_the_centres(blobs: np.ndarray) -> None:
    potential: dict[str, float] = {}
    for name, kw in (("sampled", {"init_sample": 200}), ("random", {"init": "random"})):
        potential[name] = _potential(blobs, _seeded_centres(KMeans(8, device="cpu", **kw), blobs))
    # a 200-row sample of 3,000 still holds every blob, and k-means++ over it seeds them all
    assert potential["sampled"] < 0.5 * potential["random"]


# ---------------------------------------------------------------------- determinism and reuse
def test_same_seed_same_result_and_no_global_state_change(blobs: np.ndarray) -> None:
    torch_state, np_state, threads = torch.get_rng_state(), np.random.get_state(), torch.get_num_threads()
    a = KMeans(8, n_init=3, seed=11, device="cpu").fit(blobs)
    b = KMeans(8, n_init=3, seed=11, device="cpu").fit(blobs)
    assert torch.get_num_threads() == threads  # a small fit runs on one thread, then restores the setting
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert (a.inertia_, a.n_iter_, a.best_init_) == (b.inertia_, b.n_iter_, b.best_init_)


@pytest.mark.parametrize("normalize", [False, True])
def test_predict_transform_confidence_and_from_centers(normalize: bool, overlapping: np.ndarray) -> None:
    x = overlapping
    km = KMeans(12, n_init=2, normalize=normalize, seed=0, device="cpu").fit(x)
    np.testing.assert_array_equal(km.predict(x), km.labels_)
    space = _l2(x) if normalize else x
    d2 = ((space[:, None, :].astype(np.float64) - km.cluster_centers_[None].astype(np.float64)) ** 2).sum(-1)
    t = km.transform(x)
    assert t.dtype == np.float32 and t.shape == (len(x), 12)
    np.testing.assert_allclose(t, d2, rtol=1e-4, atol=1e-4)
    dist = np.sqrt(np.sort(d2, axis=1)[:, :2])
    conf = km.confidence(x)
    assert conf.dtype == np.float32 and conf.min() >= 0 and conf.max() <= 1
    np.testing.assert_allclose(conf, 1 - dist[:, 0] / dist[:, 1], rtol=1e-3, atol=1e-4)

    again = KMeans.from_centers(km.cluster_centers_, normalize=normalize, device="cpu")
    np.testing.assert_array_equal(again.predict(x), km.labels_)
    np.testing.assert_array_equal(again.transform(x), t)
    np.testing.assert_array_equal(again.confidence(x), conf)
    same = KMeans(12, n_init=2, normalize=normalize, seed=0, device="cpu")
    np.testing.assert_array_equal(same.fit_predict(x), km.labels_)


def test_confidence_high_for_separated_blobs_lower_for_overlap(overlapping: np.ndarray) -> None:
    tight = _mixture(2000, 16, 6, spread=10.0, std=0.05, seed=6)
    c_tight = KMeans(6, n_init=3, seed=0, device="cpu").fit(tight).confidence(tight)
    assert np.median(c_tight) > 0.9
    c_over = KMeans(12, n_init=3, seed=0, device="cpu").fit(overlapping).confidence(overlapping)
    assert np.median(c_over) < np.median(c_tight)


# ---------------------------------------------------------------------- inputs
@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_equals_unchunked(normalize: bool) -> None:
    x = _mixture(700, 12, 5, spread=3.0, std=1.0, seed=7)
    whole = KMeans(5, n_init=3, normalize=normalize, seed=2, device="cpu").fit(x)
    tiny = KMeans(5, n_init=3, normalize=normalize, seed=2, device="cpu", chunk_size=37).fit(x)
    np.testing.assert_array_equal(tiny.labels_, whole.labels_)
    np.testing.assert_allclose(tiny.cluster_centers_, whole.cluster_centers_, atol=1e-5)
    assert tiny.inertia_ == pytest.approx(whole.inertia_, rel=1e-6)
    assert tiny.n_iter_ == whole.n_iter_ and tiny.best_init_ == whole.best_init_
    np.testing.assert_allclose(tiny.confidence(x), whole.confidence(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [False, True])
def test_readonly_memmap_tensor_and_float64_inputs(normalize: bool, tmp_path: Path, blobs: np.ndarray) -> None:
    np.save(tmp_path / "x.npy", blobs)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ref = KMeans(8, n_init=2, normalize=normalize, seed=1, device="cpu").fit(blobs)
    for x in (mm, torch.from_numpy(blobs.copy()), blobs.astype(np.float64), np.asfortranarray(blobs)):
        km = KMeans(8, n_init=2, normalize=normalize, seed=1, device="cpu", chunk_size=1000).fit(x)
        np.testing.assert_array_equal(km.labels_, ref.labels_)
        np.testing.assert_array_equal(km.predict(x), ref.labels_)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), blobs)  # input untouched


def test_verbose_reports_iterations(blobs: np.ndarray, capsys: pytest.CaptureFixture) -> None:
    KMeans(8, n_init=2, seed=0, device="cpu", verbose=True).fit(blobs)
    out = capsys.readouterr().out
    assert "KMeans init 0" in out and "KMeans init 1" in out and "centre shift" in out


# ---------------------------------------------------------------------- validation
def test_n_clusters_errors() -> None:
    x = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    with pytest.raises(StageError, match=r"n_clusters=50 is larger than the number of nodes \(30\)"):
        KMeans(50).fit(x)
    with pytest.raises(StageError, match="at least 2 clusters"):
        KMeans(1).fit(x)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_named(bad: float, normalize: bool) -> None:
    x = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    for r in (3, 150, 151, 152, 160, 199):
        x[r, r % 4] = bad
    with pytest.raises(StageError, match=r"NaN or inf in 6 rows; first offending rows: \[3, 150, 151, 152, 160\]"):
        KMeans(3, chunk_size=64, normalize=normalize).fit(x)
    km = KMeans.from_centers(np.zeros((2, 4), np.float32), normalize=normalize, chunk_size=64)
    with pytest.raises(StageError, match=r"first offending rows: \[3, 150"):
        km.predict(x)


def test_huge_finite_values_are_not_flagged() -> None:
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    x[7] = 3e30  # squares overflow float32, values are finite
    km = KMeans(2, n_init=1, seed=0).fit(x)
    assert km.labels_[7] != km.labels_[0]


def test_shape_and_parameter_errors() -> None:
    with pytest.raises(StageError, match="2-D"):
        KMeans(2).fit(np.zeros(10, np.float32))
    with pytest.raises(StageError, match="2-D"):
        KMeans(2).fit(np.zeros((4, 3, 2), np.float32))
    km = KMeans.from_centers(np.eye(3, dtype=np.float32))
    with pytest.raises(StageError, match="X has 4 columns but the KMeans centres have 3"):
        km.predict(np.zeros((5, 4), np.float32))
    with pytest.raises(StageError, match="NaN or inf"):
        KMeans.from_centers(np.array([[0.0, np.nan]]))
    with pytest.raises(RuntimeError, match="not fitted"):
        KMeans(2).predict(np.zeros((5, 4), np.float32))
    with pytest.raises(ConfigError, match="init"):
        KMeans(2, init="kmeans||")
    with pytest.raises(ConfigError, match="n_init"):
        KMeans(2, n_init=0)
    for bad in (1, 2.5, 0):
        with pytest.raises(ConfigError, match="init_sample must be an integer >= n_clusters"):
            KMeans(3, init_sample=bad)
    for bad in ("tpu", "meta", "cuda:x"):
        with pytest.raises(ConfigError, match="device"):
            KMeans(2, device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            KMeans(2, device="cuda")


def test_cluster_config_init_sample_reaches_the_cluster_stage_kmeans(blobs: np.ndarray, monkeypatch) -> None:
    from types import SimpleNamespace

    from pydantic import ValidationError

    from agcpipe.config import ClusterConfig
    from agcpipe.methods import registry

    seen: list[int] = []
    real = KMeans._kmeans_pp
    monkeypatch.setattr(KMeans, "_kmeans_pp", lambda self, X, *a: seen.append(X.shape[0]) or real(self, X, *a))
    method = registry.get("ssgc").build({})
    ctx = SimpleNamespace(n_clusters=8, seed=0, device="cpu")
    out = method.cluster(ctx, blobs, ClusterConfig(n_init=2, init_sample=300))
    assert seen == [300, 300] and out.labels.shape == (len(blobs),)
    with pytest.raises(ConfigError, match="init_sample must be an integer >= n_clusters \\(8\\)"):
        method.cluster(ctx, blobs, ClusterConfig(init_sample=5))
    with pytest.raises(ValidationError, match="init_sample"):
        ClusterConfig(init_sample=1)
