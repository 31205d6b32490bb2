import numpy as np
import pytest

from engine.errors import ModelError
from engine.postprocess import classify, softmax
from engine.specs import OutputKind


def test_softmax_matches_definition_and_is_stable():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 0.0]], dtype=np.float32)
    p = softmax(x.copy())
    e = np.exp(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(p[0], e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0.0], atol=1e-6)


def test_classify_logits_gives_labels():
    raw = np.array([[2.0, -1.0], [0.0, 3.0]], dtype=np.float32)
    c = classify(raw, OutputKind.LOGITS, ("female", "male"), "gender/alpha")
    assert c.labels == ("female", "male")
    np.testing.assert_allclose(c.probabilities.sum(axis=1), 1.0, rtol=1e-6)


def test_probabilities_pass_through():
    raw = np.array([[0.25, 0.75]], dtype=np.float32)
    c = classify(raw, OutputKind.PROBABILITIES, ("female", "male"), "g")
    np.testing.assert_array_equal(c.probabilities, raw)
    assert c.labels == ("male",)


def test_logits_declared_as_probabilities_are_refused():
    raw = np.array([[3.0, -2.0]], dtype=np.float32)
    with pytest.raises(ModelError, match='output = "logits"'):
        classify(raw, OutputKind.PROBABILITIES, ("a", "b"), "g")


@pytest.mark.parametrize("raw", [np.zeros((2, 3)), np.full((1, 2), np.nan)])
def test_bad_output_shape_or_values(raw):
    with pytest.raises(ModelError):
        classify(raw, OutputKind.LOGITS, ("a", "b"), "g")
