import dataclasses
import json

import pytest

from engine.errors import SpecError
from engine.specs import (
    AlphaMode,
    Architecture,
    ChannelOrder,
    CropPosition,
    HubSource,
    OutputKind,
    ResizeRule,
    SpecRegistry,
    Task,
    spec_as_dict,
    spec_work_sha256,
)


def test_builtin_specs_match_the_model_cards():
    reg = SpecRegistry.builtin()
    assert {s.key for s in reg} == {"gender/alpha", "gender/beta", "quality/baseline", "quality/head_crop"}
    g = reg.get("gender")  # default variant
    assert g.key == "gender/alpha" and g.architecture is Architecture.RESNET18
    assert g.labels == ("female", "male")
    assert g.preprocess.size == 224 and g.preprocess.crop is CropPosition.TOP_LEFT
    assert g.preprocess.antialias is False  # the card resizes with cv2, which does not antialias
    assert reg.get(Task.GENDER, "beta").architecture is Architecture.RESNET50
    q = reg.get("quality", "head_crop")
    assert q.labels == ("poor", "ok", "good", "excellent")
    assert q.preprocess.size == 384 and q.preprocess.crop is CropPosition.CENTER
    assert q.preprocess.mean == (0.485, 0.456, 0.406) and q.preprocess.alpha is AlphaMode.WHITE
    assert q.preprocess.antialias is True  # timm resizes with PIL, which does
    # what the cards do not confirm is marked, not hidden
    assert {"output", "preprocess.channel_order", "preprocess.mean"} <= g.unconfirmed
    assert "output" in q.unconfirmed
    assert g.is_confirmed("labels")


@pytest.mark.parametrize(
    "hw, size, rule, expect",
    [
        ((1080, 1920), 384, ResizeRule.SHORT_SIDE, (384, 682)),  # int(1920*384/1080) = 682
        ((1920, 1080), 224, ResizeRule.SHORT_SIDE, (398, 224)),
        ((100, 100), 384, ResizeRule.SHORT_SIDE, (384, 384)),
        ((50, 51), 224, ResizeRule.SHORT_SIDE, (224, 228)),
        ((1080, 1920), 224, ResizeRule.SQUASH, (224, 224)),
    ],
)
def test_resized_shape(hw, size, rule, expect):
    import dataclasses

    pre = dataclasses.replace(SpecRegistry.builtin().get("quality").preprocess, size=size, resize=rule)
    assert pre.resized_shape(*hw) == expect


def test_crop_origin():
    reg = SpecRegistry.builtin()
    assert reg.get("gender").preprocess.crop_origin(398, 224) == (0, 0)
    assert reg.get("quality").preprocess.crop_origin(384, 682) == (0, 149)
    with pytest.raises(ValueError):
        reg.get("quality").preprocess.resized_shape(0, 10)


def test_override_file_changes_fields_and_clears_unconfirmed(tmp_path):
    f = tmp_path / "specs.toml"
    f.write_text(
        """
[gender.alpha]
output = "logits"
[gender.alpha.preprocess]
channel_order = "bgr"
mean = [0.5, 0.5, 0.5]

[quality.tuned]
base = "quality/head_crop"
labels = ["a", "b", "c", "d"]
"""
    )
    reg = SpecRegistry.load(f)
    g = reg.get("gender", "alpha")
    assert g.output is OutputKind.LOGITS
    assert g.preprocess.channel_order is ChannelOrder.BGR and g.preprocess.mean == (0.5, 0.5, 0.5)
    assert "output" not in g.unconfirmed and "preprocess.mean" not in g.unconfirmed
    assert "preprocess.std" in g.unconfirmed  # untouched facts stay marked
    t = reg.get("quality", "tuned")
    assert t.labels == ("a", "b", "c", "d") and t.preprocess.size == 384 and t.hub is None
    # a new variant is not the base's published file, nor unconfirmed about its hub source
    assert t.published_as == "none (a variant based on quality/head_crop)"
    assert not any(f.startswith("hub.") for f in t.unconfirmed) and "output" in t.unconfirmed
    # the built-ins are untouched
    assert SpecRegistry.builtin().get("gender").output is OutputKind.PROBABILITIES


@pytest.mark.parametrize(
    "text, message",
    [
        ("[gender.alpha]\noutput = 'softmaxed'\n", "not one of"),
        ("[gender.alpha]\ncolour = 1\n", "unknown field"),
        ("[gender.alpha.preprocess]\nsize = 3\n", "between 8 and 4096"),
        ("[gender.alpha.preprocess]\nstd = [0, 1, 1]\n", "positive"),
        ("[gender.alpha.preprocess]\nstd = [1e-300, 1, 1]\n", r"preprocess\.std values must be at least 0.0001"),
        ("[gender.alpha.preprocess]\nstd = [1, 1, 5e-5]\n", r"preprocess\.std values must be at least 0.0001"),
        ("[gender.alpha.preprocess]\nstd = [1, 1e300, 1]\n", r"preprocess\.std values must be at most 1e\+06"),
        ("[gender.alpha.preprocess]\nmean = [1e300, 0.5, 0.5]\n", r"preprocess\.mean values must be at most"),
        ("[gender.alpha.preprocess]\nstd = [inf, 1, 1]\n", r"preprocess\.std must be a list of three numbers"),
        ("[gender.alpha.preprocess]\nmean = [nan, 0.5, 0.5]\n", r"preprocess\.mean must be a list of three numbers"),
        ("[gender.alpha.preprocess]\nmean = [0.5, 0.5]\n", "three numbers"),
        ("[gender.new]\nlabels = ['x', 'y']\n", "base ="),
        ("[gender.new]\nbase = 'quality/baseline'\n", "another task"),
        ("[gender.new]\nbase = ['gender/alpha']\n", "base must be a spec name"),
        ("[faces.alpha]\n", "task"),
        ("[gender.alpha]\nlabels = ['a', 'a']\n", "unique"),
        ("not toml = = =", "not valid TOML"),
        ("[gender.alpha.preprocess]\nantialias = 1\n", "true or false"),
        ("[gender.alpha]\nhub = 'owner/name'\n", "hub must be a table"),
        ("[gender.alpha.hub]\nrevision = 'main'\n", "unknown hub field"),
        ("[gender.alpha.hub]\nrepo = '../../etc'\n", "hub.repo must be"),
        ("[gender.alpha.hub]\nrepo = 'no-owner'\n", "hub.repo must be"),
        ("[gender.alpha.hub]\nfilename = '../model.onnx'\n", "hub.filename must be"),
        ("[gender.alpha.hub]\nfilename = '/abs/model.onnx'\n", "hub.filename must be"),
        ("[gender.alpha.hub]\nfilename = 'a\\u0000b.onnx'\n", "hub.filename must be"),
        ("[gender.new]\nbase = 'gender/alpha'\nhub = {repo = 'a/b'}\n", "both repo and filename"),
    ],
)
def test_bad_override_is_one_clear_error(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(SpecError, match=message):
        SpecRegistry.load(f)


def test_a_spec_file_can_say_where_the_published_onnx_is(tmp_path, monkeypatch):
    """A built-in variant's unconfirmed hub path, corrected; a new variant with its own
    published file. What is set is no longer unconfirmed, and the published file is
    looked for (and cached) there."""
    from engine.errors import ModelError
    from engine.models import ModelSource, resolve_model

    f = tmp_path / "hub.toml"
    f.write_text(
        "[quality.head_crop.hub]\nrepo = 'someone/face-quality-head'\n\n"
        "[gender.mine]\nbase = 'gender/alpha'\nhub = {repo = 'me/gender', filename = 'onnx/model.onnx'}\n"
    )
    reg = SpecRegistry.load(f)
    head = reg.get("quality", "head_crop")
    assert head.hub == HubSource("someone/face-quality-head", "model.onnx")  # filename kept
    assert head.published_as == "someone/face-quality-head (model.onnx)"  # the name follows the file
    # where the file comes from is not the work: a run's record (and resume) does not change
    from engine.specs import spec_work_sha256

    assert spec_work_sha256(head) == spec_work_sha256(SpecRegistry.builtin().get("quality", "head_crop"))
    relabelled = dataclasses.replace(head, labels=("a", "b", "c", "d"))
    assert spec_work_sha256(relabelled) != spec_work_sha256(head)
    assert "hub.repo" not in head.unconfirmed and "output" in head.unconfirmed
    mine = reg.get("gender", "mine")
    assert mine.hub == HubSource("me/gender", "onnx/model.onnx") and mine.published_as == "me/gender (onnx/model.onnx)"
    with pytest.raises(ModelError, match=r"the published me/gender/onnx/model\.onnx is not cached at .*"
                                         r"published/me/gender/onnx/model\.onnx and downloading is off"):
        resolve_model(mine, ModelSource(download=False), tmp_path / "cache")


def test_a_variant_based_on_itself_is_an_override_of_it(tmp_path):
    f = tmp_path / "self.toml"
    f.write_text("[quality.head_crop]\nbase = 'quality/head_crop'\noutput = 'logits'\n")
    builtin, t = SpecRegistry.builtin().get("quality", "head_crop"), SpecRegistry.load(f).get("quality", "head_crop")
    assert t.output is OutputKind.LOGITS and t.hub == builtin.hub and t.published_as == builtin.published_as


def test_missing_override_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        SpecRegistry.load(tmp_path / "nope.toml")


def test_unknown_variant():
    with pytest.raises(SpecError, match="known: alpha, beta"):
        SpecRegistry.builtin().get("gender", "gamma")


def test_spec_as_dict_is_json():
    d = spec_as_dict(SpecRegistry.builtin().get("quality"))
    assert json.loads(json.dumps(d))["preprocess"]["interpolation"] == "bicubic"
    assert d["key"] == "quality/baseline" and d["unconfirmed"] == ["output"]


@pytest.mark.parametrize("change", [
    {"output": OutputKind.LOGITS},
    {"labels": ("a", "b")},
    {"architecture": Architecture.RESNET50},
])
def test_each_work_field_changes_the_spec_digest(change):
    """The digest names the spec in the run record: a spec file that only corrects the
    output kind (logits) makes another configuration, never resumed into the old rows."""
    g = SpecRegistry.builtin().get("gender")
    assert spec_work_sha256(dataclasses.replace(g, **change)) != spec_work_sha256(g)


def test_a_single_label_is_refused(tmp_path):
    f = tmp_path / "one.toml"
    f.write_text("[gender.alpha]\nlabels = ['only']\n")
    with pytest.raises(SpecError, match="at least two"):
        SpecRegistry.load(f)


@pytest.mark.parametrize("size", [8, 4096])
def test_preprocess_size_bounds_are_inclusive(tmp_path, size):
    f = tmp_path / "size.toml"
    f.write_text(f"[gender.alpha.preprocess]\nsize = {size}\n")
    assert SpecRegistry.load(f).get("gender").preprocess.size == size
