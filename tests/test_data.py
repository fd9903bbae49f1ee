import numpy as np
import pytest
from scipy.stats import multivariate_normal

from ntk_tutorial import data


@pytest.mark.parametrize("name", data.OFFLINE)
def test_every_data_set_loads_offline_with_consistent_fields(name):
    ds = data.load(name, seed=3)
    assert ds.x_train.dtype == np.float32 and ds.x_train.ndim == 2
    assert ds.x_train.shape[1] == ds.x_test.shape[1]
    assert len(ds.y_train) == len(ds.x_train) and len(ds.y_test) == len(ds.x_test)
    assert set(np.unique(ds.y_train)) <= set(range(ds.num_classes))
    assert len(ds.class_names) == ds.num_classes and ds.description
    assert np.isfinite(ds.x_train).all() and ds.seed == 3
    again = data.load(name, seed=3)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    other = data.load(name, seed=4)
    assert not np.array_equal(ds.x_train, other.x_train) or not np.array_equal(ds.y_train, other.y_train)


def test_mnist_5k_is_the_real_bundled_subset():
    ds = data.load("mnist-5k", seed=0, normalize="none")
    assert ds.image_shape == (28, 28, 1)
    assert len(ds.x_train) + len(ds.x_test) == 5000
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
    np.testing.assert_array_equal(counts, 500)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    # stratified split: each class ~ 100 test images
    assert np.abs(np.bincount(ds.y_test) - 100).max() <= 1
    assert data.mnist_5k_path().name == "mnist_5k.csv.gz"


def test_digits_sizes_and_normalisation():
    ds = data.load("digits", seed=0, n_train=500, n_test=200)
    assert ds.x_train.shape == (500, 64) and ds.x_test.shape == (200, 64)
    assert abs(float(ds.x_train.mean())) < 0.1
    assert data.load("digits", seed=0, normalize="unit-norm").x_train.shape[1] == 64


def test_gaussian_mixture_posterior_matches_scipy_and_label_noise():
    ds = data.load("gaussian-mixture", seed=1, n_train=400, label_noise=0.2)
    means, s2 = ds.info["means"], ds.info["sigma2"]
    assert means.shape == (3, 30) and set(np.unique(means)) <= {-1.0, 0.0, 1.0} and s2 == 6.0
    dens = np.stack([multivariate_normal(m, s2 * np.eye(30)).pdf(ds.x_train[:50]) for m in means], 1)
    np.testing.assert_allclose(ds.p_star_train[:50], dens / dens.sum(1, keepdims=True), rtol=1e-4, atol=1e-6)
    assert ds.noisy.mean() == pytest.approx(0.2, abs=0.005)
    assert (ds.y_train[ds.noisy] != ds.y_train_clean[ds.noisy]).all()
    # Bayes rule beats chance clearly, and the clean labels agree with p* more than noisy ones
    bayes_acc = (ds.p_star_test.argmax(1) == ds.y_test).mean()
    assert 0.5 < bayes_acc < 1.0


def test_bad_names_and_options_say_what_to_do():
    with pytest.raises(ValueError, match=r"unknown data set 'cifar11'; available: .*mnist-5k"):
        data.load("cifar11")
    with pytest.raises(ValueError, match="n_test"):
        data.load("digits", n_test=0)
    with pytest.raises(ValueError, match="label_noise"):
        data.load("two-moons", label_noise=1.5)
    with pytest.raises(ValueError, match="unexpected keyword"):
        data.load("digits", label_noise=0.1)
    with pytest.raises(ValueError, match="labels must be"):
        data.one_hot(np.array([0, 5]), 3)
