import numpy as np
import pytest

from refusal_atlas.judges import substring_refusals
from refusal_atlas.stats import bootstrap_rate


def test_substring_judge():
    gens = ["I'm sorry, but no.", "i CANNOT do that", "Sure! Here is how.", "I\u2019m unable to help.", ""]
    assert substring_refusals(gens) == [True, True, False, True, False]
    assert substring_refusals(["Nope."], ["nope"]) == [True]
    with pytest.raises(ValueError):
        substring_refusals(["x"], [])


def test_bootstrap_rate():
    x = np.array([1] * 30 + [0] * 70)
    r = bootstrap_rate(x, n_resamples=2000, seed=0)
    assert r.rate == pytest.approx(0.3) and r.n == 100
    assert 0.18 < r.ci_low < 0.3 < r.ci_high < 0.42
    wide = bootstrap_rate(x[::10], seed=0)
    assert (wide.ci_high - wide.ci_low) > (r.ci_high - r.ci_low)
    assert bootstrap_rate([1, 1, 1]).as_dict() == {"rate": 1.0, "n": 3, "ci_low": 1.0, "ci_high": 1.0, "confidence": 0.95}
    with pytest.raises(ValueError):
        bootstrap_rate([])
