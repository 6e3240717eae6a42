"""Sampling semantics against a plain-numpy reference, and sampling correctness (chi-square)."""

import jax
import numpy as np
import pytest

from jengine import SamplingParams, plan, sampling


def numpy_processed(raw: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """Reference: temperature -> min-p -> top-k -> top-p (mass strictly above < top_p)."""
    raw = raw.astype(np.float64)
    if sp.temperature == 0:
        return raw
    z = raw / sp.temperature

    def softmax(v):
        e = np.exp(v - np.max(v[np.isfinite(v)]))
        e[~np.isfinite(v)] = 0
        return e / e.sum()

    p = softmax(z)
    z = np.where(p >= sp.min_p * p.max(), z, -np.inf)
    if sp.top_k:
        kth = np.sort(z)[::-1][sp.top_k - 1]
        z = np.where(z >= kth, z, -np.inf)
    if sp.top_p < 1:
        p = softmax(z)
        order = np.argsort(-p, kind="stable")
        above = np.cumsum(p[order]) - p[order]
        keep_sorted = above < sp.top_p
        keep = np.zeros_like(keep_sorted)
        keep[order] = keep_sorted
        z = np.where(keep, z, -np.inf)
    return z


def numpy_logprobs(z):
    m = np.max(z[np.isfinite(z)])
    lse = np.log(np.sum(np.exp(z[np.isfinite(z)] - m))) + m
    return z - lse


CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.0),
    SamplingParams(top_k=5),
    SamplingParams(top_p=0.8),
    SamplingParams(min_p=0.1),
    SamplingParams(temperature=0.6, top_k=20, top_p=0.9),
    SamplingParams(temperature=1.3, min_p=0.05, top_k=30),
    SamplingParams(temperature=0.9, min_p=0.02, top_k=50, top_p=0.7),
    SamplingParams(top_k=1),
]


@pytest.mark.parametrize("sp", CASES, ids=str)
def test_processed_logprobs_match_numpy(sp):
    rng = np.random.default_rng(1)
    raw = (rng.standard_normal((7, 300)) * 3).astype(np.float32)
    targets = [int(np.argsort(-r)[i]) for i, r in zip([0, 1, 3, 7, 15, 40, 100], raw)]
    rp = plan.SampleRows.of([sp] * 7, [0] * 7, [5] * 7, targets)
    sel = sampling.select(raw, jax.tree_util.tree_map(np.asarray, rp), "processed_logprobs")
    for r in range(7):
        want = numpy_logprobs(numpy_processed(raw[r], sp))[targets[r]]
        got = float(sel.value[r])
        if np.isinf(want):
            assert np.isneginf(got), (r, got)
        else:
            assert abs(got - want) < 1e-5, (r, got, want)
        assert int(sel.token[r]) == targets[r]


@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logits", "raw_logits"])
def test_other_logprobs_modes(mode):
    rng = np.random.default_rng(2)
    raw = rng.standard_normal((3, 50)).astype(np.float32)
    sp = SamplingParams(temperature=0.5, top_k=10)
    targets = [int(np.argmax(r)) for r in raw]
    rp = plan.SampleRows.of([sp] * 3, [0] * 3, [0] * 3, targets)
    sel = sampling.select(raw, rp, mode)
    for r in range(3):
        z = numpy_processed(raw[r], sp)
        want = {"raw_logprobs": numpy_logprobs(raw[r].astype(np.float64)), "processed_logits": z,
                "raw_logits": raw[r]}[mode][targets[r]]
        assert abs(float(sel.value[r]) - want) < 1e-5


def test_sampled_frequencies_match_processed_distribution():
    """Chi-square at a fixed seed: 4000 draws (seed varies) at one row vs the processed probs."""
    rng = np.random.default_rng(3)
    raw = rng.standard_normal(40).astype(np.float32) * 1.5
    sp = SamplingParams(temperature=0.8, top_k=12, top_p=0.95)
    n = 4000
    rp = plan.SampleRows.of([sp] * n, list(range(n)), [17] * n)
    sel = sampling.select(np.tile(raw, (n, 1)), rp, "processed_logprobs")
    probs = np.exp(numpy_logprobs(numpy_processed(raw, sp)))
    support = probs > 0
    counts = np.bincount(np.asarray(sel.token), minlength=40)
    assert counts[~support].sum() == 0, "sampled a token the filters dropped"
    expected = probs[support] * n
    chi2 = float(np.sum((counts[support] - expected) ** 2 / expected))
    dof = int(support.sum()) - 1
    # 99.9% quantile of chi-square is below dof + 4.5*sqrt(2*dof) + 10 for these dof
    assert chi2 < dof + 4.5 * np.sqrt(2 * dof) + 10, (chi2, dof)


def documented_uniform(seed: int, position: int) -> np.float32:
    """The documented counter rule, computed here: uniform(fold_in(key(seed), position))."""
    key = jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), position)
    return np.float32(jax.random.uniform(key, (), np.float32))


def test_draws_depend_on_seed_and_position_only():
    """Each row's uniform is the documented `fold_in(key(seed), position)` draw of its own seed
    and position (rows differ in both), its token is the inverse-CDF of that uniform on its
    processed distribution, and a row keeps its token and logprob bits in another batch at another
    row index. A key that ignores the row's position, or takes another row's seed, fails."""
    rng = np.random.default_rng(4)
    n = 6
    raw = rng.standard_normal((n, 64)).astype(np.float32)
    sp = SamplingParams(temperature=1.0)
    seeds = [11, 12, 3, 4000, 2**31 + 5, 7]
    positions = [3, 9, 17, 1, 250, 3]  # row 5 shares row 0's position, row 1 is row 0's seed + 1
    u = sampling.uniform_draw(np.asarray(seeds, np.uint32), np.asarray(positions, np.int32))
    u = np.asarray(u)
    want_u = np.array([documented_uniform(s, p) for s, p in zip(seeds, positions)])
    differ = np.flatnonzero(u.view(np.uint32) != want_u.view(np.uint32))
    assert differ.size == 0, f"rows {differ.tolist()}: uniform is not fold_in(key(seed), position)"
    a = sampling.select(raw, plan.SampleRows.of([sp] * n, seeds, positions), "processed_logprobs")
    for r in range(n):  # the token is the inverse CDF of that uniform (draws away from boundaries)
        z = numpy_processed(raw[r], sp)
        p = np.exp(numpy_logprobs(z))
        assert np.min(np.abs(np.cumsum(p) - want_u[r])) > 1e-5, "draw too close to a boundary"
        assert int(a.token[r]) == numpy_inverse_cdf(z, float(want_u[r])), r
    # the same rows in a different batch, at different row indices
    rows = [4, 2, 0]
    rp = plan.SampleRows.of([sp] * 3, [seeds[i] for i in rows], [positions[i] for i in rows])
    b = sampling.select(raw[rows], rp, "processed_logprobs")
    assert np.array_equal(np.asarray(a.token)[rows], np.asarray(b.token))
    a_bits, b_bits = np.asarray(a.value)[rows].view(np.uint32), np.asarray(b.value).view(np.uint32)
    assert np.array_equal(a_bits, b_bits)


def test_greedy_is_argmax_of_raw():
    rng = np.random.default_rng(5)
    raw = rng.standard_normal((4, 80)).astype(np.float32)
    rp = plan.SampleRows.of([SamplingParams(temperature=0.0)] * 4, [0] * 4, [0] * 4)
    sel = sampling.select(raw, rp, "processed_logprobs")
    assert np.array_equal(np.asarray(sel.token), raw.argmax(-1))


def numpy_inverse_cdf(z: np.ndarray, u: float) -> int:
    """Reference: first token whose float64 cumulative probability exceeds u."""
    p = np.exp(z.astype(np.float64) - np.max(z[np.isfinite(z)]))
    p[~np.isfinite(z)] = 0
    cdf = np.cumsum(p / p.sum())
    return int(np.searchsorted(cdf, u, side="right"))


def test_inverse_cdf_matches_numpy_away_from_boundaries():
    rng = np.random.default_rng(6)
    vocab = 1000  # not a multiple of CDF_BLOCK: the padded tail block is exercised
    z = (rng.standard_normal((64, vocab)) * 2).astype(np.float32)
    z[:, rng.choice(vocab, 300, replace=False)] = -np.inf  # dropped by a filter
    u = rng.random(64).astype(np.float32)
    got = np.asarray(sampling.inverse_cdf(z, u))
    checked = 0
    for r in range(64):
        p = np.exp(z[r].astype(np.float64) - z[r][np.isfinite(z[r])].max())
        p[~np.isfinite(z[r])] = 0
        cdf = np.cumsum(p / p.sum())
        if np.min(np.abs(cdf - u[r])) < 1e-5:  # fp32 rounding may pick a neighbour here
            continue
        assert got[r] == numpy_inverse_cdf(z[r], float(u[r])), r
        checked += 1
    assert checked > 55


@pytest.mark.parametrize("u", [0.0, 0.5, np.nextafter(np.float32(1), np.float32(0))])
def test_inverse_cdf_never_returns_a_dropped_token(u):
    vocab = 700
    z = np.full((3, vocab), -np.inf, np.float32)
    z[0, 5] = 0.0  # one survivor, in the first block
    z[1, [3, 511]] = [1.0, 30.0]  # the last survivor sits mid-vocabulary, followed by dropped blocks
    z[2, vocab - 1] = -3.0  # the very last token
    got = np.asarray(sampling.inverse_cdf(z, np.full((3,), u, np.float32)))
    assert got[0] == 5 and got[2] == vocab - 1
    assert got[1] in (3, 511) and (u < 0.5 or got[1] == 511)


@pytest.mark.parametrize(
    "sp", [SamplingParams(top_p=0.5), SamplingParams(top_k=2), SamplingParams(top_k=3, top_p=0.7)], ids=str
)
def test_filters_keep_ties_at_the_threshold(sp):
    """Exact ties with the smallest kept value are all kept (the module docstring's rule).

    Row 0 holds probabilities [.4, .2, .2, .1, .1]: top_p=.5 keeps .4 (nothing above it) and the
    first .2 (.4 above it), so the threshold is .2 and both .2 are kept; top_k=2's 2nd largest is
    .2; top_k=3 then top_p=.7 renormalises to [.5, .25, .25] and keeps both .25. Row 1 permutes row 0.
    """
    raw = np.log(np.array([[0.4, 0.2, 0.2, 0.1, 0.1], [0.1, 0.2, 0.4, 0.2, 0.1]], np.float32))
    rp = plan.SampleRows.of([sp] * 2, [0, 0], [0, 0])
    got = np.asarray(sampling.processed_logits(raw, jax.tree_util.tree_map(np.asarray, rp)))
    assert np.array_equal(np.isfinite(got), [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]]), got


def test_top_candidates_are_the_exact_largest_entries():
    """Block maxima preselect the blocks; the values are exactly `lax.top_k`'s (ties, -inf and a
    vocabulary that is not a multiple of the block included)."""
    rng = np.random.default_rng(7)
    for vocab in (5, 64, 300, 1000, 2049):
        z = np.round(rng.standard_normal((5, vocab)) * 4).astype(np.float32)  # many ties
        z[1, : vocab // 2] = -np.inf
        z[2] = 0.0
        vals, idx = sampling._top_candidates(jax.numpy.asarray(z))
        k = min(sampling.TOP_CANDIDATES, vocab)
        want = np.sort(z, axis=-1)[:, ::-1][:, :k]
        assert np.array_equal(np.asarray(vals), want), vocab
        assert np.array_equal(np.take_along_axis(z, np.asarray(idx), -1), want), vocab
        assert all(len(set(r)) == k for r in np.asarray(idx).tolist())  # distinct entries


# Rows whose k or nucleus does not fit the candidates (bisection) next to rows that fit.
FALLBACK_CASES = [
    SamplingParams(top_k=sampling.TOP_CANDIDATES + 37),
    SamplingParams(temperature=4.0, top_p=0.95),  # a flat row: the nucleus is most of the vocabulary
    SamplingParams(temperature=0.5, top_p=0.6),  # a peaked row: it fits
    SamplingParams(temperature=2.0, top_k=sampling.TOP_CANDIDATES + 1, top_p=0.9),
]


@pytest.mark.parametrize("sp", FALLBACK_CASES, ids=str)
def test_thresholds_past_the_candidates_match_numpy(sp):
    rng = np.random.default_rng(8)
    raw = rng.standard_normal((3, 1000)).astype(np.float32)
    rp = plan.SampleRows.of([sp] * 3, [0] * 3, [0] * 3)
    got = np.asarray(sampling.processed_logits(raw, jax.tree_util.tree_map(np.asarray, rp)))
    for r in range(3):
        want = numpy_processed(raw[r], sp)
        assert np.array_equal(np.isfinite(got[r]), np.isfinite(want)), (r, np.isfinite(got[r]).sum(), np.isfinite(want).sum())


def test_a_row_keeps_its_bits_in_every_tile_and_batch():
    """Token, value and top alternatives of a row are the same bits alone (batch 1), at every row
    position of batches of 2 to 19 rows (whole, partial and several sampling tiles), next to rows
    that need the bisection fallbacks, with top_n on or off."""
    rng = np.random.default_rng(9)
    vocab = 700
    params = [PARAMS_FOR_TILES[i % len(PARAMS_FOR_TILES)] for i in range(19)]
    raw = (rng.standard_normal((19, vocab)) * 2).astype(np.float32)
    rp = plan.SampleRows.of(params, list(range(19)), [3 + i for i in range(19)])

    def rows(idx):
        return jax.tree_util.tree_map(lambda a: a[np.asarray(idx)], rp)

    select = jax.jit(sampling.select, static_argnums=(2, 3))
    for top_n in (0, 3):
        alone = [select(raw[i : i + 1], rows([i]), "processed_logprobs", top_n) for i in range(19)]
        for n in (2, 7, 8, 9, 16, 19):
            order = rng.permutation(19)[:n]
            got = select(raw[order], rows(order), "processed_logprobs", top_n)
            for j, i in enumerate(order):
                for field in ("token", "value", "top_ids", "top_values"):
                    a = np.atleast_1d(np.asarray(getattr(got, field))[j])
                    b = np.atleast_1d(np.asarray(getattr(alone[i], field))[0])
                    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), (field, n, i)
    plain = select(raw, rp, "processed_logprobs", 0)
    with_top = select(raw, rp, "processed_logprobs", 3)
    assert np.array_equal(np.asarray(plain.value).view(np.uint32), np.asarray(with_top.value).view(np.uint32))


PARAMS_FOR_TILES = [
    SamplingParams(),
    SamplingParams(temperature=0.0),
    *FALLBACK_CASES,
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01),
]


def test_greedy_takes_the_first_of_tied_maxima():
    raw = np.zeros((3, 40), np.float32)
    raw[0, [7, 30]] = 2.0
    raw[1, [0, 39]] = 1.0
    raw[2] = -1.0
    rp = plan.SampleRows.of([SamplingParams(temperature=0.0)] * 3, [0] * 3, [0] * 3)
    assert np.asarray(sampling.select(raw, rp, "processed_logprobs").token).tolist() == [7, 0, 0]
