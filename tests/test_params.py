"""params.yaml schema: every refusal names the offending key."""

from pathlib import Path

import pytest

from cvfp.errors import ParamsError
from cvfp.params import Params, load_params, validate

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def refusal(raw) -> str:
    with pytest.raises(ParamsError) as caught:
        validate(raw)
    return str(caught.value)


def load_text(tmp_path, text: str) -> Params:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return load_params(path)


def test_repository_params_are_valid_and_match_the_schema_defaults():
    assert load_params(REPO_PARAMS) == Params()


@pytest.mark.parametrize("raw, key", [
    ({"carve": {"val_fraction": 0.2, "val_fracton": 0.3}}, "carve.val_fracton"),
    ({"tokeniser": {}}, "tokeniser"),
])
def test_unknown_key_is_named(raw, key):
    message = refusal(raw)
    assert f"{key}: unknown key" in message


def test_string_number_is_not_coerced():
    assert "carve.val_fraction" in refusal({"carve": {"val_fraction": "0.1"}})


def test_yaml_1_2_reads_exponent_as_float_and_quoted_exponent_as_string(tmp_path):
    text = REPO_PARAMS.read_text().replace("  lr: 0.002", "  lr: 1e-3")
    assert load_text(tmp_path, text).phase1.lr == pytest.approx(0.001)
    with pytest.raises(ParamsError, match=r"phase1\.lr"):
        load_text(tmp_path, 'phase1:\n  lr: "1e-3"\n')


@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_out_of_range(value):
    assert "carve.val_fraction" in refusal({"carve": {"val_fraction": value}})


def test_num_samples_must_be_positive():
    assert "data.num_samples" in refusal({"data": {"num_samples": 0}})


@pytest.mark.parametrize("text, key", [
    ("seed: 0\nseed: 1\n", "seed"),
    ("carve:\n  val_fraction: 0.1\n  val_fraction: 0.2\n", "val_fraction"),
])
def test_duplicate_keys_are_refused(tmp_path, text, key):
    with pytest.raises(ParamsError, match="duplicate key") as caught:
        load_text(tmp_path, text)
    assert key in str(caught.value)


def test_no_is_a_string_in_yaml_1_2(tmp_path):
    with pytest.raises(ParamsError) as caught:
        load_text(tmp_path, "device: no\n")
    assert "device" in str(caught.value) and "'no'" in str(caught.value)
    with pytest.raises(ParamsError, match=r"model\.decoder"):
        load_text(tmp_path, "model:\n  decoder: no\n")


def test_hidden_dim_must_be_context_plus_embed():
    message = refusal({"model": {"context_dim": 8, "embed_dim": 4, "hidden_dim": 10}})
    assert "model.hidden_dim" in message and "8 + 4 = 12" in message and "got 10" in message


def test_random_carve_is_refused_naming_the_allowed_method():
    message = refusal({"carve": {"method": "random"}})
    assert "carve.method" in message and "'tail'" in message


def test_files_source_needs_files():
    assert "data.files" in refusal({"data": {"source": "files"}})


def test_every_key_must_be_set_explicitly(tmp_path):
    """A value from a code default would be invisible to `dvc params diff` and `dvc exp run -S`."""
    text = REPO_PARAMS.read_text().replace("  patience: 3\n", "")
    with pytest.raises(ParamsError, match=r"missing: phase2\.patience"):
        load_text(tmp_path, text)
