"""``ConfigError`` carries the field its message names, read once; renaming it keeps the class and the detail."""

from __future__ import annotations

import pytest

from mmtard.errors import ConfigError
from mmtard.preflight import renamed_fields
from mmtard.train.rundir import RunLockedError


def test_the_field_is_read_from_the_message_once():
    error = ConfigError("data.dir: '/nope' does not exist")
    assert (error.field, error.detail) == ("data.dir", "'/nope' does not exist")
    assert ConfigError("a sentence without a field").field is None
    assert ConfigError("expected a folder", field="--out").field == "--out"


def test_renaming_keeps_the_class_and_the_detail_and_within_names_the_section():
    renamed = RunLockedError("output_dir: locked by process 7").renamed("--out")
    assert type(renamed) is RunLockedError and str(renamed) == "--out: locked by process 7"
    assert renamed.field == "--out"
    inner = ConfigError("inner: expected ce").within("method")
    assert str(inner) == "method.inner: expected ce" and inner.field == "method.inner"


def test_renamed_fields_renames_only_the_fields_it_is_given():
    with pytest.raises(ConfigError, match=r"^--data-dir: missing$"), renamed_fields({"data_dir": "--data-dir"}):
        raise ConfigError("data_dir: missing")
    with pytest.raises(ConfigError, match=r"^split: unknown$"), renamed_fields({"data_dir": "--data-dir"}):
        raise ConfigError("split: unknown")
