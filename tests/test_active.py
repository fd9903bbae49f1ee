"""Active learning (issue 5): strategies, the resumable runner, the al / al-plot commands."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ntk_tutorial import data, lookahead, models, train
from ntk_tutorial.active import run as R
from ntk_tutorial.active import strategies as S

# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """A small float64 MLP with dropout trained on 30 labels; a pool of 60 candidates."""
    model = models.MLP((64, 48, 10), dropout=0.2, param_dtype=jnp.float64,
                       rngs=nnx.Rngs(params=jax.random.key(0)))
    apply_fn, params = models.functional(model)
    x_l, y_l = digits.x_train[:30].astype(np.float64), digits.y_train[:30]
    params = train.train(apply_fn, params, x_l, y_l, lr=1.0, epochs=60, loss="mse").params
    return apply_fn, params, x_l, y_l, digits.x_train[100:160].astype(np.float64)


def make_ctx(trained, kernel="pntk"):
    apply_fn, params, x_l, y_l, x_p = trained
    return S.Context(apply_fn, params, x_l, y_l, x_p, 10, kernel=kernel, mc_samples=8)


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(S.STRATEGIES))
def test_strategy_returns_distinct_valid_indices_deterministically(trained, name):
    ctx = make_ctx(trained)
    a = S.select(name, ctx, 7, jax.random.key(3))
    b = S.STRATEGIES[name](make_ctx(trained), 7, jax.random.key(3))
    assert a.shape == (7,) and len(set(a.tolist())) == 7
    assert a.min() >= 0 and a.max() < len(ctx.x_pool)
    np.testing.assert_array_equal(a, b)
    assert S.STRATEGIES[name](ctx, 0, jax.random.key(3)).shape == (0,)


def test_registry_lists_every_strategy_of_the_issue():
    assert set(S.STRATEGIES) == {"random", "entropy", "margin", "bald", "badge", "coreset", "mlmoc",
                                 "mlmoc-flips", "emoc"}
    with pytest.raises(ValueError, match="unknown strategy"):
        S.get("nope")


def test_entropy_and_margin_against_hand_computed_numbers():
    logits = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    ctx = S.Context(None, None, np.zeros((0, 1)), np.zeros(0, int), np.zeros((4, 1)), 3,
                    logits=logits, labelled_logits=np.zeros((0, 3)))
    # p = (1/3,1/3,1/3): log 3; (e^2, 1, 1)/(e^2+2); (e, e, 1)/(2e+1)
    np.testing.assert_allclose(S.entropy_scores(ctx)[:3], [1.0986123, 0.6655727, 1.0173572], rtol=1e-6)
    np.testing.assert_allclose(-S.margin_scores(ctx)[:3], [0.0, 0.6804791, 0.0], atol=1e-6)
    np.testing.assert_array_equal(S.STRATEGIES["entropy"](ctx, 3, 0), [0, 2, 1])
    assert set(S.STRATEGIES["margin"](ctx, 2, 0).tolist()) == {0, 2}
    assert S.STRATEGIES["margin"](ctx, 4, 0)[-1] == 3


def test_k_center_greedy_matches_brute_force():
    rng = np.random.default_rng(0)
    pool, centres = rng.normal(size=(15, 3)), rng.normal(size=(2, 3))
    got = S.k_center_greedy(pool, centres, 6)
    chosen, cs = [], [c for c in centres]
    for _ in range(6):
        best, best_d = None, -1.0
        for i, p in enumerate(pool):
            if i in chosen:
                continue
            d = min(float(np.sum((p - c) ** 2)) for c in cs)
            if d > best_d:
                best, best_d = i, d
        chosen.append(best)
        cs.append(pool[best])
    np.testing.assert_array_equal(got, chosen)


def test_kmeans_pp_seeding_starts_at_largest_norm_and_is_deterministic():
    emb = np.random.default_rng(1).normal(size=(20, 4))
    a = S.kmeans_pp_seeding(emb, 5, jax.random.key(0))
    assert a[0] == np.argmax((emb**2).sum(1)) and len(set(a.tolist())) == 5
    np.testing.assert_array_equal(a, S.kmeans_pp_seeding(emb, 5, jax.random.key(0)))


def test_bald_is_zero_without_dropout_and_positive_with_it(trained):
    apply_fn, params, x_l, y_l, x_p = trained
    ctx = make_ctx(trained)
    with_dropout = S.bald_scores(ctx, jax.random.key(0))
    assert np.all(with_dropout >= -1e-12) and np.max(with_dropout) > 1e-4  # mutual information
    # the same weights without dropout: every MC sample is the same network, so BALD is 0
    plain, _ = models.functional(models.MLP((64, 48, 10), param_dtype=jnp.float64,
                                            rngs=nnx.Rngs(params=jax.random.key(0))))
    np.testing.assert_allclose(np.asarray(plain(params, x_p)), np.asarray(apply_fn(params, x_p)), rtol=1e-12)
    ctx_plain = S.Context(plain, params, x_l, y_l, x_p, 10, mc_samples=8)
    np.testing.assert_allclose(S.bald_scores(ctx_plain, jax.random.key(0)), 0.0, atol=1e-12)


@pytest.mark.parametrize("kernel,relative_to", [("pntk", "network"), ("pntk", "proxy"), ("entk", "network")])
def test_mlmoc_scores_match_direct_lookahead_reference(trained, kernel, relative_to):
    """Eq. (13) (L2), the flip count and EMOC against a direct solve of Eq. (11) per candidate;
    the change is measured from the network or from the proxy, the pseudo-label is the arg-max of
    that reference, EMOC's probabilities those of the candidate."""
    apply_fn, params, x_l, y_l, x_p = trained
    ctx = make_ctx(trained, kernel)
    ctx.relative_to = relative_to
    l2, flips = S.mlmoc_scores(ctx, "l2"), S.mlmoc_scores(ctx, "flips")
    emoc = S.emoc_scores(ctx) if kernel == "pntk" else None  # the eNTK's EMOC is slow on 2 cores
    kern = S.KERNELS[kernel]
    x_all = jnp.asarray(np.concatenate([x_l, x_p]))
    k_all = np.asarray(kern(apply_fn, params, x_all), np.float64)
    n = len(x_l)
    k_ll, k_sl, k_ss = k_all[:n, :n], k_all[n:, :n], k_all[n:, n:]
    f_l, f_s = np.asarray(apply_fn(params, x_l)), np.asarray(apply_fn(params, x_p))
    y_onehot = np.eye(10)[y_l]
    f_lin = lookahead.kernel_regression(k_ll, y_onehot, k_sl, f_train=f_l, f_test=f_s)
    ref = f_s if relative_to == "network" else f_lin
    probs = S.softmax(f_s)
    for j in ((0, 5, 17, 42) if kernel == "pntk" else (3, 42)):
        def after(label):
            return lookahead.lookahead_predictions(k_ll, y_onehot, k_sl[j], k_ss[j, j], label, k_sl,
                                                   k_ss[:, j], f_train=f_l, f_cand=f_s[j], f_test=f_s)
        f_plus = after(np.eye(10)[np.argmax(ref[j])])
        np.testing.assert_allclose(l2[j], np.linalg.norm(f_plus - ref, axis=1).sum(), rtol=1e-6)
        assert flips[j] == np.sum(np.argmax(f_plus, 1) != np.argmax(ref, 1))
        if emoc is None:
            continue
        want = sum(probs[j, c] * np.linalg.norm(after(np.eye(10)[c]) - ref, axis=1).sum() for c in range(10))
        np.testing.assert_allclose(emoc[j], want, rtol=1e-6)


def test_simplex_projection_is_the_closest_distribution():
    """Against the KKT conditions of min ||p - y||^2 on the simplex and a bisection on lambda."""
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.normal(size=(200, 7)), rng.normal(size=(50, 7)) * 5,
                        np.eye(7)[rng.integers(0, 7, 20)] + 0.1 * rng.normal(size=(20, 7))])
    p = S.simplex_projection(y)
    assert np.all(p >= 0) and np.allclose(p.sum(1), 1.0)
    for yi, pi in zip(y, p):
        lo, hi = -np.max(yi), 1.0 - np.min(yi)  # sum max(y + lam, 0) = 1 is increasing in lam
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if np.maximum(yi + mid, 0).sum() < 1 else (lo, mid)
        np.testing.assert_allclose(pi, np.maximum(yi + lo, 0), atol=1e-9)
    # square-loss outputs near a corner stay there; softmax flattens them
    f = np.array([[0.9, 0.05, 0.02, -0.03, 0.0, 0.01, 0.0, -0.02, 0.03, 0.0]])
    assert S.simplex_projection(f)[0, 0] > 0.85 and S.softmax(f)[0, 0] < 0.25


def test_infinite_and_one_step_proxies(trained):
    """The infinite-width proxies use the MLP's own analytic kernels; the one-step-SGD proxy is
    the first-order change of one real SGD step on the candidate."""
    from ntk_tutorial import kernels

    apply_fn, params, x_l, y_l, x_p = trained
    for proxy, fn in (("infinite-ntk", kernels.infinite_ntk), ("gp", kernels.infinite_nngp)):
        ctx = make_ctx(trained)
        ctx.proxy = proxy
        setup = S.lookahead_setup(ctx)
        np.testing.assert_allclose(setup.k_pool_pool, fn(x_p, depth=1), rtol=1e-7)
        want = lookahead.kernel_regression(fn(x_l, depth=1), np.eye(10)[y_l], fn(x_p, x_l, depth=1))
        np.testing.assert_allclose(setup.prediction, want, rtol=1e-6, atol=1e-9)
    ctx = make_ctx(trained, "entk")
    ctx.proxy, ctx.lr = "one-step-sgd", 1e-4
    y = np.eye(10)[np.argmax(ctx.logits, 1)]
    change = S.lookahead_change(ctx, y, None)
    j = 7
    grads = jax.grad(lambda p: 0.5 * jnp.sum((apply_fn(p, x_p[j:j + 1]) - y[j]) ** 2))(params)
    stepped = jax.tree.map(lambda a, g: a - ctx.lr * g, params, grads)
    real = np.asarray(apply_fn(stepped, x_p)) - ctx.logits
    np.testing.assert_allclose(change[j], real, rtol=1e-3, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------

TINY = dict(dataset="digits", init=10, query=5, subset=40, hidden=(32,), epochs=20, lr=0.3)


def _strip(line: str) -> dict:
    rec = json.loads(line)
    rec.pop("timings")
    rec["config"].pop("cycles")
    return rec


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    cfg = R.config_from_preset(None, **TINY, strategy="mlmoc", cycles=2)
    R.run_experiment(cfg, tmp_path / "a")
    path = R.results_path(tmp_path / "a", "mlmoc", 0)
    with open(path, "a") as fh:  # killed while writing the next line
        fh.write('{"cycle": 2, "strat')
    R.run_experiment(R.replace(cfg, cycles=4), tmp_path / "a")
    R.run_experiment(R.replace(cfg, cycles=4), tmp_path / "b")
    lines_a = path.read_text().splitlines()
    lines_b = R.results_path(tmp_path / "b", "mlmoc", 0).read_text().splitlines()
    assert len(lines_a) == 4
    assert [_strip(x) for x in lines_a] == [_strip(x) for x in lines_b]
    # running again adds nothing
    assert len(R.run_experiment(R.replace(cfg, cycles=4), tmp_path / "a")) == 4
    assert len(path.read_text().splitlines()) == 4
    recs = R.read_results(path)
    assert [r["n_labelled"] for r in recs] == [10, 15, 20, 25]
    for r in recs:
        assert not set(r["queried"]) & set(r["labelled"]) and len(set(r["queried"])) == 5
        assert {"config", "seed", "accuracy", "timings", "versions"} <= set(r)


def test_corrupt_lines_are_set_aside_and_every_valid_cycle_kept(tmp_path):
    cfg = R.config_from_preset(None, **TINY, strategy="random", cycles=2)
    R.run_experiment(cfg, tmp_path)
    path = R.results_path(tmp_path, "random", 0)
    with pytest.raises(R.ResultsError, match="another configuration.*lr"):
        R.run_experiment(R.replace(cfg, lr=0.5), tmp_path)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\nnot json\n" + lines[1] + "\n")
    with pytest.warns(R.ResultsWarning, match="line 2: corrupt.*2 valid cycle"):
        recs = R.run_experiment(cfg, tmp_path)
    assert [r["cycle"] for r in recs] == [0, 1]
    assert path.read_text().splitlines() == lines  # both valid cycles kept, nothing recomputed
    assert R.rejected_path(path).read_text() == "not json\n"  # set aside, not deleted
    path.write_text(lines[1] + "\n")
    with pytest.warns(R.ResultsWarning, match="cycle 1 where cycle 0"):
        assert R.read_results(path) == []


@pytest.mark.parametrize("strategy", ["mlmoc", "mlmoc-flips"])
def test_sequential_mode_is_the_released_selection(tmp_path, strategy, digits):
    """Sequential querying against a naive re-implementation of the released
    ``sequential_selection``: per pick, refit the proxy on L + the picks (true labels) by a direct
    solve, score every unpicked candidate by a direct solve of Eq. (11) with the pseudo-label
    arg-max of the current proxy, measured from the current proxy and summed over all of S."""
    cfg = R.config_from_preset(None, **TINY, strategy=strategy, cycles=1, mode="sequential")
    assert cfg.relative_to == "proxy"
    rec = R.run_experiment(cfg, tmp_path)[0]
    ds = R.load_data(cfg)
    apply_fn, params, state = R.build_model(cfg, 64, 10)
    params, _ = R._load_params(R._params_path(R.results_path(tmp_path, cfg), 0), R._saved(params, state))
    lab = np.asarray(rec["labelled"])
    rng = np.random.default_rng([cfg.seed, 0, 0x5B])
    cand = np.sort(rng.choice(np.setdiff1d(np.arange(len(ds.x_train)), lab), cfg.subset, replace=False))
    x_all = jnp.asarray(np.concatenate([ds.x_train[lab], ds.x_train[cand]]))
    k_all = np.asarray(S.KERNELS["pntk"](apply_fn, params, x_all), np.float64)
    f_all = np.asarray(apply_fn(params, x_all), np.float64)
    n, eye = len(lab), np.eye(10)
    train_pos, y_train = list(range(n)), list(eye[ds.y_train[lab]])
    pool = np.arange(n, n + len(cand))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 0), 1)
    picks = []
    for step in range(cfg.query):
        t = np.asarray(train_pos)
        ref = lookahead.kernel_regression(k_all[np.ix_(t, t)], np.asarray(y_train), k_all[np.ix_(pool, t)],
                                          f_train=f_all[t], f_test=f_all[pool])
        scores = np.full(len(pool), -np.inf)
        for c in range(len(pool)):
            if c in picks:
                continue
            t2 = np.concatenate([t, [pool[c]]])
            y2 = np.concatenate([np.asarray(y_train), eye[[np.argmax(ref[c])]]])
            after = lookahead.kernel_regression(k_all[np.ix_(t2, t2)], y2, k_all[np.ix_(pool, t2)],
                                                f_train=f_all[t2], f_test=f_all[pool])
            scores[c] = (np.linalg.norm(after - ref, axis=1).sum() if strategy == "mlmoc"
                         else np.sum(np.argmax(after, 1) != np.argmax(ref, 1)))
        c = int(S.top_b(scores, 1, jax.random.fold_in(key, step))[0])
        picks.append(c)
        train_pos.append(pool[c])
        y_train.append(eye[ds.y_train[cand[c]]])  # the true label
    assert rec["queried"] == [int(cand[c]) for c in picks]


def test_sequential_and_hybrid_modes(tmp_path):
    for mode in ("sequential", "hybrid"):
        cfg = R.config_from_preset(None, **TINY, strategy="mlmoc", cycles=2, mode=mode, step=2,
                                   retrain_every=3)
        recs = R.run_experiment(cfg, tmp_path / mode)
        assert [r["n_labelled"] for r in recs] == [10, 15]
        for r in recs:
            assert len(set(r["queried"])) == 5 and not set(r["queried"]) & set(r["labelled"])
    with pytest.raises(ValueError, match="look-ahead strategy"):
        R.config_from_preset(None, **TINY, strategy="entropy", mode="sequential")


def test_presets_keep_paper_numbers_and_build_the_paper_models():
    from ntk_tutorial import models

    assert {"cpu-digits", "demo-mnist-5k", "cpu-mnist-5k", "mnist", "svhn", "cifar10", "cifar100"} <= set(R.PRESETS)
    got = {p: (R.PRESETS[p]["init"], R.PRESETS[p]["query"], R.PRESETS[p]["subset"], R.PRESETS[p]["model"])
           for p in ("mnist", "svhn", "cifar10", "cifar100")}
    assert got == {"mnist": (100, 20, 4000, "wrn"), "svhn": (1000, 1000, 6000, "wrn"),
                   "cifar10": (1000, 1000, 6000, "wrn"), "cifar100": (10000, 1000, 6000, "resnet18")}
    # "one- or two-layer WideResNet with maximum width 640": the released structure's widest stage
    for name, stages, image in (("mnist", 1, (28, 28, 1)), ("svhn", 1, (32, 32, 3)), ("cifar10", 2, (32, 32, 3))):
        cfg = R.config_from_preset(name)
        apply_fn, params, state = R.build_model(cfg, int(np.prod(image)), 10, image)
        model = nnx.merge(apply_fn.graphdef, apply_fn.params_template, apply_fn.state_template)
        assert isinstance(model, models.LookaheadWRN) and model.stages == stages
        assert params["head"]["kernel"].shape == (640, 10) and params["stem"]["kernel"].shape[-1] == 16 * cfg.widen
        assert state is not None and apply_fn.stateful  # batch norm: statistics travel beside the params
    for name in R.PRESETS:  # every setting of a paper preset says where it comes from
        rows = R.describe_preset(name)
        if name in ("mnist", "svhn", "cifar10", "cifar100", "cpu-mnist-5k"):
            assert all(src in ("paper", "released", "ours") for _, _, src, _ in rows), name
    with pytest.raises(ValueError, match="image_shape"):
        R.build_model(R.config_from_preset("cifar10"), 3072, 10)
    with pytest.raises(ValueError, match="unknown model"):
        R.config_from_preset("cifar10", model="vgg")
    assert R.parse_seeds("0-2") == [0, 1, 2] and R.parse_seeds("1,4") == [1, 4]
    with pytest.raises(ValueError, match="dropout"):
        R.config_from_preset("cpu-digits", strategy="bald")


def test_cli_al_paper_preset_without_the_data_says_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    from ntk_tutorial import cli

    from dataclasses import replace

    from ntk_tutorial import remote

    monkeypatch.setenv(remote.DATA_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setenv(remote.TIMEOUT_ENV, "1")
    rs = remote.REMOTE["cifar10"]  # no network here: a loopback port nobody listens on
    monkeypatch.setitem(remote.REMOTE, "cifar10", replace(
        rs, files=tuple(replace(f, urls=(f"http://127.0.0.1:9/{f.name}",)) for f in rs.files)))
    assert cli.main(["al", "--preset", "cifar10", "--out", str(tmp_path / "out")]) == 1
    assert "data fetch cifar10" in capsys.readouterr().err


def test_runner_with_cross_entropy_dropout_and_feature_strategies(tmp_path):
    for strategy in ("bald", "badge", "coreset"):
        cfg = R.config_from_preset(None, **TINY, strategy=strategy, cycles=2, loss="xent", dropout=0.2)
        recs = R.run_experiment(cfg, tmp_path)
        assert [r["n_labelled"] for r in recs] == [10, 15] and 0 < recs[-1]["accuracy"] <= 1
        assert len(set(recs[0]["queried"])) == 5


def test_cli_al_and_al_plot(tmp_path):
    out = tmp_path / "al"
    base = [sys.executable, "-m", "ntk_tutorial.cli"]
    cmd = base + ["al", "--preset", "cpu-digits", "--strategy", "mlmoc", "random", "--seeds", "0-1",
                  "--cycles", "2", "--init", "10", "--query", "5", "--subset", "40", "--hidden", "32",
                  "--epochs", "20", "--jobs", "2", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.glob("*.jsonl")) == [
        "mlmoc_seed0.jsonl", "mlmoc_seed1.jsonl", "random_seed0.jsonl", "random_seed1.jsonl"]
    assert all(len(p.read_text().splitlines()) == 2 for p in out.glob("*.jsonl"))
    res = subprocess.run(base + ["al-plot", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "mlmoc" in res.stdout and "random" in res.stdout and "AUC" in res.stdout
    assert (out / "al_curves.png").stat().st_size > 1000


def test_readme_presets_table_is_the_generated_one():
    """The README's side-by-side preset table is exactly what presets_markdown() prints today."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = R.presets_markdown()
    assert f"<!-- presets:begin -->\n{table}\n<!-- presets:end -->" in readme
    for name in R.README_PRESETS:  # and it names every preset it describes
        assert f"`{name}`" in table


def test_paper_presets_take_the_released_sgd_steps():
    """The paper-width presets' lr and weight decay, on this package's loss, give the steps of the
    released code: PyTorch SGD (momentum 0.9, weight decay coupled to the gradient) on
    ``MSELoss()`` (the mean over the batch and the k outputs of (f - y)^2), written out here by hand."""
    from helpers import mlp

    k, n, epochs = 10, 12, 4
    apply_fn, params = mlp((5, 7, k), seed=3)
    x = np.random.default_rng(0).normal(size=(n, 5))
    y = np.eye(k)[np.arange(n) % k]
    released = {"lr": 0.3, "momentum": 0.9, "weight_decay": 1e-4}

    def torch_mse(p):  # torch.nn.MSELoss() with reduction="mean"
        return jnp.mean((apply_fn(p, x) - y) ** 2)

    want, buf = params, jax.tree.map(jnp.zeros_like, params)
    for _ in range(epochs):  # full batch: one step per epoch
        g = jax.tree.map(lambda gi, w: gi + released["weight_decay"] * w, jax.grad(torch_mse)(want), want)
        buf = jax.tree.map(lambda b, gi: released["momentum"] * b + gi, buf, g)
        want = jax.tree.map(lambda w, b: w - released["lr"] * b, want, buf)
    for preset in ("mnist", "svhn", "cifar10"):
        cfg = R.config_from_preset(preset)
        assert (cfg.momentum, cfg.batch_size, cfg.epochs) == (0.9, 128, 200)
        got = train.train(apply_fn, params, x, y, lr=cfg.lr, epochs=epochs, loss="mse", momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, batch_size=n, key=jax.random.key(0)).params
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
    c100 = R.config_from_preset("cifar100")  # k = 100
    assert np.isclose(c100.lr, 0.3 * 2 / 100) and np.isclose(c100.weight_decay, 1e-4 * 100 / 2)
