"""op_builder.knobs: every environment variable, parsed in one place, read when asked for."""
from __future__ import annotations

import pytest

from op_builder import knobs
from op_builder.knobs import KNOBS, KnobError, build_var_enabled, parse_bool, snapshot


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in KNOBS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("raw, expected", [
    ("1", True), ("true", True), ("TRUE", True), ("True", True), ("yes", True), ("Yes", True), ("on", True),
    (" 1 ", True), ("y", True), ("t", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("NO", False), ("off", False), ("", False),
    ("  ", False), ("n", False), ("f", False),
])
def test_parse_bool(raw, expected):
    assert parse_bool("X", raw) is expected


@pytest.mark.parametrize("raw", ["2", "-1", "maybe", "enable", "1.0", "truee", "0x1"])
def test_parse_bool_garbage_names_the_variable(raw):
    with pytest.raises(KnobError) as info:
        parse_bool("DS_BUILD_OPS", raw)
    assert "DS_BUILD_OPS" in str(info.value) and repr(raw) in str(info.value)


def test_knob_error_is_a_value_error():
    assert issubclass(KnobError, ValueError)


def test_defaults_when_unset():
    assert knobs.get("DS_BUILD_OPS") is False
    assert knobs.get("DS_BUILD_TIMEOUT") == 1800.0
    assert knobs.get("MAX_JOBS") is None
    assert knobs.get("TORCH_CUDA_ARCH_LIST") is None
    assert knobs.get("DSINF_BACKEND") == "auto"
    assert knobs.get("DS_KI_FALLBACK") is True
    assert KNOBS["DS_BUILD_OPS"].read() == (False, "default")


def test_read_reports_the_source(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", " 3 ")
    assert KNOBS["MAX_JOBS"].read() == (3, "env")


def test_knobs_are_read_when_asked_not_at_import(monkeypatch):
    assert knobs.get("DS_BUILD_OPS") is False
    monkeypatch.setenv("DS_BUILD_OPS", "yes")
    assert knobs.get("DS_BUILD_OPS") is True
    monkeypatch.setenv("DS_BUILD_TIMEOUT", "2.5")
    assert knobs.get("DS_BUILD_TIMEOUT") == 2.5


@pytest.mark.parametrize("name, raw, fragment", [
    ("MAX_JOBS", "abc", "not an integer"),
    ("MAX_JOBS", "0", "must be >= 1"),
    ("MAX_JOBS", "-4", "must be >= 1"),
    ("MAX_JOBS", "2.5", "not an integer"),
    ("DS_BUILD_TIMEOUT", "soon", "not a number"),
    ("DS_BUILD_TIMEOUT", "0", "must be > 0"),
    ("DS_BUILD_TIMEOUT", "-1", "must be > 0"),
    ("DS_BUILD_TIMEOUT", "nan", "finite"),  # nan compared false with everything: waited forever
    ("DS_BUILD_TIMEOUT", "inf", "finite"),
    ("DSINF_BUILD_TIME_LIMIT", "abc", "not a number"),
    ("DSINF_BUILD_TIME_LIMIT", "-1", "must be > 0"),
    ("DSINF_BUILD_TIME_LIMIT", "0", "must be > 0"),
    ("DSINF_BUILD_TIME_LIMIT", "nan", "finite"),
    ("DSINF_BUILD_TIME_LIMIT", "-inf", "finite"),
    ("DSINF_BUILD_TIME_LIMIT", "inf", "finite"),
    ("DS_BUILD_OPS", "sure", "not a boolean"),
    ("DSINF_NO_PREBUILT", "2", "not a boolean"),
    ("DS_KI_FALLBACK", "nope", "not a boolean"),
    ("DSINF_BACKEND", "cuda", "expected one of"),
])
def test_invalid_values_raise_knob_error_naming_the_variable(monkeypatch, name, raw, fragment):
    monkeypatch.setenv(name, raw)
    with pytest.raises(KnobError) as info:
        knobs.get(name)
    assert name in str(info.value) and fragment in str(info.value)


def test_backend_values(monkeypatch):
    for raw, expected in [("torch", "torch"), ("TRITON", "triton"), (" compiled ", "compiled"), ("", "auto")]:
        monkeypatch.setenv("DSINF_BACKEND", raw)
        assert knobs.get("DSINF_BACKEND") == expected


@pytest.mark.parametrize("raw, expected", [
    (None, None), ("", None), ("   ", None), ("1", True), ("true", True), ("yes", True), ("0", False),
    ("false", False), ("no", False),
])
def test_build_var_enabled(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv("DS_BUILD_SOME_OP", raising=False)
    else:
        monkeypatch.setenv("DS_BUILD_SOME_OP", raw)
    assert build_var_enabled("DS_BUILD_SOME_OP") is expected


def test_build_var_garbage_names_the_variable(monkeypatch):
    monkeypatch.setenv("DS_BUILD_SOME_OP", "please")
    with pytest.raises(KnobError, match="DS_BUILD_SOME_OP"):
        build_var_enabled("DS_BUILD_SOME_OP")


def test_snapshot_lists_every_knob_and_never_raises(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "abc")
    monkeypatch.setenv("DS_BUILD_OPS", "1")
    monkeypatch.setenv("DS_BUILD_TRANSFORMER_INFERENCE", "0")
    monkeypatch.setenv("DS_BUILD_SOME_OP", "please")
    rows = {r["name"]: r for r in snapshot()}
    assert set(rows) == set(KNOBS) | {"DS_BUILD_TRANSFORMER_INFERENCE", "DS_BUILD_SOME_OP"}  # per-op ones when set
    assert rows["DS_BUILD_TRANSFORMER_INFERENCE"]["value"] is False
    assert rows["DS_BUILD_SOME_OP"]["value"].startswith("INVALID")
    assert rows["MAX_JOBS"]["source"] == "env" and rows["MAX_JOBS"]["value"].startswith("INVALID")
    assert "MAX_JOBS" in rows["MAX_JOBS"]["value"]
    assert rows["DS_BUILD_OPS"] == {**rows["DS_BUILD_OPS"], "value": True, "source": "env"}
    assert rows["DS_BUILD_TIMEOUT"]["source"] == "default"
    assert all(r["meaning"] for r in rows.values())


def test_every_knob_documents_its_meaning():
    for knob in KNOBS.values():
        assert knob.name.isupper() and len(knob.meaning) > 20, knob.name


def test_build_knobs_users_expect_are_declared():
    # torch's and DeepSpeed's names, which users already set
    for name in ("TORCH_EXTENSIONS_DIR", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "CXX", "CUDA_HOME", "DS_BUILD_OPS",
                 "DS_KI_FALLBACK", "DS_BUILD_TIMEOUT"):
        assert name in KNOBS
