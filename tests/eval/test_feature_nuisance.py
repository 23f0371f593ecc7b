"""benchmarks/feature_nuisance.py: the variance shares it prints, against independent computations."""

import numpy as np
import torch
from sklearn.linear_model import LinearRegression

from benchmark_scripts import benchmark_script


def test_intensity_statistics_of_known_images():
    flat = torch.full((1, 1, 8, 8), 0.25)
    board = torch.from_numpy(np.indices((8, 8)).sum(0) % 2).float()[None, None]
    with benchmark_script("feature_nuisance") as module:
        stats = module.intensity_statistics(torch.cat([flat, board]))
    torch.testing.assert_close(stats[0], torch.tensor([0.25, 0.0, 0.25, 0.25, 0.25, 0.0]))
    # a 0/1 checkerboard: mean 1/2, every quantile in {0, 1}, Laplacian +-4 at every inner pixel
    assert stats[1, 0] == 0.5 and stats[1, 2] == 0.0 and stats[1, 4] == 1.0
    torch.testing.assert_close(stats[1, 1], torch.tensor(np.std(board.numpy(), ddof=1), dtype=torch.float32))
    assert stats[1, 5] == 4.0


def test_explained_share_matches_a_least_squares_fit_and_ranks_components():
    rng = np.random.default_rng(0)
    stats = rng.normal(size=(400, 3))
    features = np.column_stack([2 * stats[:, 0] - stats[:, 2], rng.normal(size=400) * 3,
                                stats[:, 1] + rng.normal(size=400)])
    fitted = LinearRegression().fit(stats, features).predict(stats)
    expected = ((fitted - fitted.mean(0)) ** 2).sum() / ((features - features.mean(0)) ** 2).sum()
    with benchmark_script("feature_nuisance") as module:
        share = module.explained_share(torch.from_numpy(stats), torch.from_numpy(features))
        assert abs(share - expected) < 1e-9
        assert module.explained_share(torch.from_numpy(stats), torch.from_numpy(features[:, :1])) > 0.999
        scores = module.leading_components(torch.from_numpy(features), k=2)
        z = module.standardiser(torch.from_numpy(features))(torch.from_numpy(features))
    eigen = np.sort(np.linalg.eigvalsh(np.cov(features.T)))[::-1]
    np.testing.assert_allclose(scores.numpy().var(0, ddof=1), eigen[:2], rtol=1e-9)
    np.testing.assert_allclose(z.numpy().std(0), 1.0, rtol=1e-6)


def test_label_matrix_one_hot_for_classes_and_as_is_for_multi_label():
    with benchmark_script("feature_nuisance") as module:
        one_hot = module.label_matrix(torch.tensor([0, 2, 1]))
        multi = module.label_matrix(torch.tensor([[1, 0], [0, 1]]))
    assert one_hot.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert multi.dtype == torch.float32 and multi.tolist() == [[1, 0], [0, 1]]
