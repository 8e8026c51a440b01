"""Closed-form checks of the metrics library (FID, KID, IS, precision/recall) and the ADM npz files."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ditgraft.eval import adm
from ditgraft.eval.metrics import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid,
    knn_radii,
    precision_recall,
    probs_from_logits,
)

METHODS = ["sqrtm", "eigh"]
FAST = settings(max_examples=25, deadline=None)


def _random_spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.linspace(1.0, cond, d)) @ q.T


# ----------------------------------------------------------------------------------------------- FID

@pytest.mark.parametrize("method", METHODS)
def test_fid_of_a_set_with_itself_is_zero(method):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32)) + 3.0
    mu, sigma = feature_stats(x)
    fid = fid_from_features(x, x, method=method)
    assert abs(fid) < 1e-6 * np.trace(sigma)


@pytest.mark.parametrize("method", METHODS)
@FAST
@given(d=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_fid_diagonal_covariances_match_elementwise_formula(method, d, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.01, 5.0, d), rng.uniform(0.01, 5.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fid_commuting_covariances(method):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T share eigenvectors: tr((S1 S2)^1/2) = sum sqrt(a b)."""
    rng = np.random.default_rng(1)
    d = 40
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, method=method)
    assert got == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("method", METHODS)
@FAST
@given(seed=st.integers(0, 10_000))
def test_fid_non_commuting_2x2_closed_form(method, seed):
    """For 2x2 PSD M with eigenvalues l1, l2: tr(M^1/2) = sqrt(tr M + 2 sqrt(det M)); M ~ S1 S2."""
    rng = np.random.default_rng(seed)
    s1, s2 = (a @ a.T + 0.05 * np.eye(2) for a in rng.normal(size=(2, 2, 2)))
    mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_fid_methods_agree_on_general_covariances():
    rng = np.random.default_rng(2)
    d = 64
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d, cond=50.0)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    b = frechet_distance(mu1, s1, mu2, s2, method="eigh")
    assert a == pytest.approx(b, rel=1e-9)


def test_fid_from_samples_converges_to_closed_form():
    rng = np.random.default_rng(3)
    d = 4
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.25])
    v1, v2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.5, 1.0, 1.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    errors = []  # sampling std of the estimate is ~2 sqrt(sum dmu^2 (v1 + v2) / n) = 0.003 at n = 1e6
    for n in (1_000, 1_000_000):
        a = mu1 + rng.standard_normal((n, d)) * np.sqrt(v1)
        b = mu2 + rng.standard_normal((n, d)) * np.sqrt(v2)
        errors.append(abs(fid_from_features(a, b) - expected))
    assert errors[1] < 0.015
    assert errors[1] < errors[0]


@pytest.mark.parametrize("method", METHODS)
def test_fid_with_fewer_samples_than_dims_is_finite(method):
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((10, 64)), rng.standard_normal((12, 64)) + 0.5
    fid = fid_from_features(a, b, method=method)
    assert np.isfinite(fid) and fid > 0


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm says "matrix is singular"; expected
@pytest.mark.parametrize("method", METHODS)
def test_fid_exactly_singular_covariance_is_finite(method):
    """Rank-1 covariances (all variation along one direction); eigh route gives the exact closed form."""
    u = np.zeros(8)
    u[0] = 1.0
    s1, s2 = 2.0 * np.outer(u, u), 0.5 * np.outer(u, u)
    fid = frechet_distance(np.zeros(8), s1, np.ones(8), s2, method=method)
    assert np.isfinite(fid)
    assert fid == pytest.approx(8.0 + 2.0 + 0.5 - 2 * 1.0, abs=1e-3)


def test_fid_input_errors_name_the_field():
    with pytest.raises(ValueError, match="mu1/mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")
    with pytest.raises(ValueError, match="imaginary component"):  # not PSD: sqrt of a negative eigenvalue
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2), method="sqrtm")
    with pytest.raises(ValueError, match="feats"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((4, 2), np.nan), np.zeros((4, 2)))


# ----------------------------------------------------------------------------------------------- KID

def _mmd2_loops(x, y, degree=3):
    """Plain reference: unbiased MMD^2 written as explicit sums over pairs."""
    k = lambda a, b: (np.dot(a, b) / len(a) + 1.0) ** degree  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_loop_reference_on_full_sets():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 3)) + 0.3
    mean, std = kid(x, y, subsets=3, subset_size=7)  # whole sets every time -> identical values
    assert mean == pytest.approx(_mmd2_loops(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_and_shift_positive():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=300)
    shift_mean, _ = kid(a, b + 1.0, subsets=20, subset_size=300)
    assert abs(same_mean) < 0.02
    assert shift_mean > 0.3
    assert shift_mean > 20 * abs(same_mean)
    assert kid(a, b, subsets=20, subset_size=300) == (same_mean, same_std)  # seeded


def test_kid_clamps_subset_size():
    rng = np.random.default_rng(7)
    mean, std = kid(rng.normal(size=(30, 4)), rng.normal(size=(50, 4)), subsets=5, subset_size=1000)
    assert np.isfinite(mean) and np.isfinite(std)
    with pytest.raises(ValueError, match="subsets"):
        kid(np.zeros((4, 2)), np.zeros((4, 2)), subsets=0)
    with pytest.raises(ValueError, match="feature dimensions"):
        kid(np.zeros((4, 2)), np.zeros((4, 3)))


# ----------------------------------------------------------------------------------------------- IS

def test_inception_score_uniform_is_one():
    mean, std = inception_score(np.full((100, 10), 0.1), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("classes,splits", [(10, 1), (10, 5), (1008, 2)])
def test_inception_score_even_one_hot_is_num_classes(classes, splits):
    probs = np.eye(classes)[np.tile(np.arange(classes), 3 * splits)]  # every split holds each class 3 times
    mean, std = inception_score(probs, splits=splits)
    assert mean == pytest.approx(classes, rel=1e-10) and std == pytest.approx(0.0, abs=1e-9)


@FAST
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 20))
def test_inception_score_bounds(seed, classes):
    logits = np.random.default_rng(seed).normal(scale=3.0, size=(40, classes))
    mean, _ = inception_score(probs_from_logits(logits), splits=4)
    assert 1.0 - 1e-9 <= mean <= classes + 1e-9


def test_inception_score_rejects_logits():
    with pytest.raises(ValueError, match="rows must sum to 1"):
        inception_score(np.random.default_rng(0).normal(size=(10, 5)) ** 2, splits=2)
    with pytest.raises(ValueError, match="splits"):
        inception_score(np.full((3, 2), 0.5), splits=4)


# ----------------------------------------------------------------------------------------------- P/R

def _pr_reference(real, fake, k=3):
    """Plain reference: full distance matrices, sorted rows."""
    def dist(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(fake, real)
    return (d <= r_real[None, :]).any(1).mean(), (d <= r_fake[:, None]).any(0).mean()


def test_precision_recall_identical_sets():
    x = np.random.default_rng(8).normal(size=(200, 8))
    assert precision_recall(x, x.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_sets():
    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=(100, 8)), rng.normal(size=(120, 8)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_outliers_lower_precision_only():
    rng = np.random.default_rng(10)
    real = rng.normal(size=(300, 4))
    fake = np.concatenate([real[:200], rng.normal(size=(50, 4)) + 50.0])  # 200 on-manifold, 50 far away
    precision, recall = precision_recall(real, fake)
    assert precision == pytest.approx(200 / 250)
    assert 0.5 < recall < 1.0


@FAST
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 40), k=st.integers(1, 5))
def test_precision_recall_batched_matches_reference(seed, batch, k):
    rng = np.random.default_rng(seed)
    real, fake = rng.normal(size=(37, 5)), rng.normal(size=(29, 5)) * 1.5 + 0.3
    got = precision_recall(real, fake, k=k, batch_size=batch)
    assert got == pytest.approx(_pr_reference(real, fake, k))


def test_knn_radii_errors():
    with pytest.raises(ValueError, match="k: got 5"):
        knn_radii(np.zeros((5, 2)), k=5)
    with pytest.raises(ValueError, match="real/fake"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------------------- ADM npz files

def _images(n=5, h=8, w=6, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_samples_npz_round_trip(tmp_path, channels):
    images, labels = _images(c=channels), np.arange(5, dtype=np.int64) * 7
    path = adm.save_samples_npz(tmp_path / "samples.npz", images, labels)
    loaded, loaded_labels = adm.load_samples_npz(path)
    assert loaded.dtype == np.uint8 and loaded.shape == images.shape and np.array_equal(loaded, images)
    assert loaded_labels.dtype == labels.dtype and np.array_equal(loaded_labels, labels)
    assert sorted(np.load(path).files) == ["arr_0", "arr_1"]  # the ADM / guided-diffusion layout
    path2 = adm.save_samples_npz(tmp_path / "nolabels.npz", images)
    assert adm.load_samples_npz(path2)[1] is None
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


def test_samples_npz_appends_suffix(tmp_path):
    path = adm.save_samples_npz(tmp_path / "samples", _images())
    assert path == tmp_path / "samples.npz" and path.is_file()
    assert not (tmp_path / "samples").exists()


def test_reference_batch_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    images = _images(n=6)
    feats, spatial = rng.normal(size=(20, 4)), rng.normal(size=(20, 3))
    mu, sigma = feature_stats(feats)
    mu_s, sigma_s = feature_stats(spatial)
    path = adm.save_reference_batch(tmp_path / "ref.npz", images, mu, sigma, mu_s, sigma_s)
    ref = adm.load_reference_batch(path)
    assert sorted(ref) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]  # the file's own keys
    assert np.array_equal(ref["arr_0"], images) and ref["arr_0"].dtype == np.uint8
    for key, value in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s)):
        assert ref[key].dtype == np.float64 and np.array_equal(ref[key], value)
    stats_only = adm.load_reference_batch(path, load_images=False)
    assert "arr_0" not in stats_only and np.array_equal(stats_only["sigma"], sigma)
    labels = np.arange(6, dtype=np.int32)
    bare = adm.load_reference_batch(adm.save_reference_batch(tmp_path / "bare.npz", images, labels=labels))
    assert sorted(bare) == ["arr_0", "arr_1"] and np.array_equal(bare["arr_1"], labels)


def test_iter_npz_batches_streams_rows(tmp_path):
    images = _images(n=11)
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, images)
        batches = list(adm.iter_npz_batches(path, batch_size=4))
        assert [len(b) for b in batches] == [4, 4, 3]
        assert np.array_equal(np.concatenate(batches), images) and batches[0].flags.writeable
    with pytest.raises(ValueError, match="missing 'arr_9'"):
        next(adm.iter_npz_batches(path, key="arr_9"))


def test_npz_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="images_uint8: dtype float32"):
        adm.save_samples_npz(tmp_path / "x.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="expected 4-D"):
        adm.save_samples_npz(tmp_path / "x.npz", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="has 4 channels"):
        adm.save_samples_npz(tmp_path / "x.npz", np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"labels: shape \(3,\)"):
        adm.save_samples_npz(tmp_path / "x.npz", _images(n=2), labels=np.arange(3))
    with pytest.raises(ValueError, match="labels: dtype float64"):
        adm.save_samples_npz(tmp_path / "x.npz", _images(n=2), labels=np.zeros(2))
    with pytest.raises(ValueError, match="'sigma' is missing"):
        adm.save_reference_batch(tmp_path / "r.npz", _images(), mu=np.zeros(3))
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        adm.save_reference_batch(tmp_path / "r.npz", _images(), mu=np.zeros(3), sigma=np.eye(4))
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.float64))
    with pytest.raises(ValueError, match="arr_0: dtype float64"):
        adm.load_samples_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "nokey.npz", images=_images())
    with pytest.raises(ValueError, match="missing 'arr_0'"):
        adm.load_reference_batch(tmp_path / "nokey.npz")
    with pytest.raises(FileNotFoundError, match="npz file not found"):
        adm.load_samples_npz(tmp_path / "absent.npz")
