import logging

import numpy as np
import pytest

import engine.postprocess
from engine.errors import ModelError
from engine.postprocess import NonFiniteOutput, classify, naming_files, softmax
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


@pytest.mark.parametrize("output", [OutputKind.LOGITS, OutputKind.PROBABILITIES])
def test_infinity_is_refused_like_nan_and_names_its_rows(output):
    """An fp16 overflow gives inf, not NaN: never written as NaN probabilities."""
    raw = np.array([[0.25, 0.75], [np.inf, 0.0], [0.5, 0.5], [0.0, -np.inf]], dtype=np.float32)
    with pytest.raises(NonFiniteOutput) as info:
        classify(raw, output, ("a", "b"), "g")
    assert info.value.rows == (1, 3)
    assert "for 2 of 4 image(s)" in str(info.value)


def test_non_finite_rows_are_named_by_the_files_they_came_from():
    """Row r of the model's output is the r-th file that decoded, not the r-th of the batch."""
    paths = ["/d/empty.png", "/d/fine.png", "/d/nan.png"]
    err = naming_files(NonFiniteOutput("g", [1], 2), paths, ok=[1, 2])
    assert "/d/nan.png" in str(err)
    assert "fine.png" not in str(err) and "empty.png" not in str(err)


def test_probabilities_that_do_not_sum_to_one_are_refused():
    """Rows summing to 0.95 (independent sigmoids, say) are not probability vectors."""
    with pytest.raises(ModelError, match=r"its rows sum to 0\.95\.\.0\.95"):
        classify(np.array([[0.5, 0.45]], dtype=np.float32), OutputKind.PROBABILITIES, ("a", "b"), "g")
    ok = classify(np.array([[0.5, 0.5005]], dtype=np.float32), OutputKind.PROBABILITIES, ("a", "b"), "g")
    assert ok.labels == ("b",)  # within the tolerance (1e-3): taken as is


def test_one_row_is_too_little_to_say_logits_are_already_probabilities(caplog, monkeypatch):
    monkeypatch.setattr(engine.postprocess, "_warned_softmaxed", set())  # once per process: start afresh
    with caplog.at_level(logging.WARNING, logger="engine.postprocess"):
        classify(np.array([[0.3, 0.7]], dtype=np.float32), OutputKind.LOGITS, ("a", "b"), "g")
        assert "already a probability vector" not in caplog.text
        classify(np.array([[0.3, 0.7], [0.6, 0.4]], dtype=np.float32), OutputKind.LOGITS, ("a", "b"), "g")
    assert "already a probability vector" in caplog.text
