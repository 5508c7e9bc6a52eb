"""scikit-learn's own estimator checks, run against GaussianMixtureEM.

Every check that scikit-learn's ``check_estimator`` applies to a density estimator runs
here; none is excluded. (``check_array_api_input`` skips itself unless SCIPY_ARRAY_API is
set: array-API inputs other than numpy and torch are not supported.)
"""

from sklearn.utils.estimator_checks import parametrize_with_checks

from inference import GaussianMixtureEM


@parametrize_with_checks(
    [
        GaussianMixtureEM(random_state=0),
        GaussianMixtureEM(2, covariance_type="diag", random_state=0),
        GaussianMixtureEM(2, covariance_type="constant", random_state=0),
    ]
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
