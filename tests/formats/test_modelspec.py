"""Family metadata for sd1 / sd2 / sd2 v-prediction (values as kohya sd-scripts writes them)."""

from __future__ import annotations

from datetime import datetime

import pytest

from sd_lora.formats.modelspec import family_metadata, missing_family_metadata

DATE = datetime(2024, 5, 17, 13, 45, 12, 345678)


def _meta(**overrides):
    kwargs = dict(family="sd1", prediction_type="epsilon", resolution=(512, 512), title="zkchar", date=DATE)
    return family_metadata(**{**kwargs, **overrides})


def test_sd1():
    assert _meta() == {
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "zkchar",
        "modelspec.date": "2024-05-17T13:45:12",
        "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon",
    }


def test_sd2_epsilon():
    meta = _meta(family="sd2", resolution=(512, 512))
    assert meta["ss_base_model_version"] == "sd_v2"
    assert meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.prediction_type"] == "epsilon"


def test_sd2_v_prediction():
    meta = _meta(family="sd2", prediction_type="v_prediction", resolution=(768, 640))
    assert meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["ss_v2"] == "True"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.resolution"] == "768x640"  # width x height


def test_sd1_v_prediction_as_kohya_writes_it():
    meta = _meta(prediction_type="v_prediction")
    assert meta["ss_base_model_version"] == "sd_v1_v"  # A1111 still reads this as SD1 (prefix sd_v1)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "v"


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_sdxl_as_kohya_writes_it(prediction):
    meta = _meta(family="sdxl", prediction_type=prediction, resolution=(1024, 1024))
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert meta["modelspec.resolution"] == "1024x1024"


def test_all_values_are_strings():
    for family, prediction in (("sd1", "epsilon"), ("sd2", "epsilon"), ("sd2", "v_prediction")):
        assert all(isinstance(v, str) for v in _meta(family=family, prediction_type=prediction).values())


def test_date_string_is_checked_and_kept():
    assert _meta(date="2024-05-17T13:45:12+02:00")["modelspec.date"] == "2024-05-17T13:45:12+02:00"
    with pytest.raises(ValueError, match="ISO 8601"):
        _meta(date="17/05/2024")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"family": "sdxl-v"}, "sd1, sd2, sdxl"),
        ({"family": "sd2-v"}, "sd1, sd2, sdxl"),
        ({"prediction_type": "v"}, "epsilon, v_prediction"),
        ({"resolution": (512, 0)}, "width, height"),
    ],
)
def test_invalid_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        _meta(**overrides)


def test_missing_family_metadata_adds_each_key_the_file_lacks_and_changes_none():
    """A1111's only SD2 test is ss_v2 == "True": an SD2 file with ss_base_model_version alone is listed as SD1."""
    assert missing_family_metadata({"ss_base_model_version": "sd_v2"}, "sd2") == {"ss_v2": "True"}
    assert missing_family_metadata({"ss_v2": "True"}, "sd2") == {"ss_base_model_version": "sd_v2"}
    assert missing_family_metadata({}, "sdxl") == {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
    assert missing_family_metadata({"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}, "sd2") == {}
    assert missing_family_metadata({}, None) == {}


def test_missing_base_model_version_follows_the_files_own_v_prediction_modelspec():
    """An SD2 768-v file with modelspec but no ss_* keys (convert / resize / merge add them) must not get `sd_v2`,
    which contradicts its modelspec; kohya writes `sd_v2_v` for it (and `sd_v1_v` for a v-prediction SD1)."""
    v2_768 = {"modelspec.architecture": "stable-diffusion-v2-768-v/lora", "modelspec.prediction_type": "v"}
    assert missing_family_metadata(v2_768, "sd2") == {"ss_base_model_version": "sd_v2_v", "ss_v2": "True"}
    assert missing_family_metadata({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2")["ss_base_model_version"] == "sd_v2_v"
    assert missing_family_metadata({"modelspec.prediction_type": "v"}, "sd1")["ss_base_model_version"] == "sd_v1_v"
    assert missing_family_metadata({"modelspec.prediction_type": "epsilon"}, "sd2")["ss_base_model_version"] == "sd_v2"
    assert missing_family_metadata({"modelspec.prediction_type": "v"}, "sdxl")["ss_base_model_version"] == "sdxl_base_v1-0"
