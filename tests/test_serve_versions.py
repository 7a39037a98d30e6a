"""Version folder names read as TF Serving reads them (`ParseVersionNumber` in
sources/storage_path/file_system_storage_path_source.cc: absl::SimpleAtoi into an int64)."""
from __future__ import annotations

import pytest

from kerasbig import export, serve, versions


@pytest.mark.parametrize("name, version", [
    ("1", 1), ("00000123", 123), ("+5", 5), ("-1", -1), (" 7\t", 7), ("9223372036854775807", 2 ** 63 - 1),
    ("9223372036854775808", None), ("1.5", None), ("0x10", None), ("1e3", None), ("", None), ("+", None),
    (".tmp-3-abc", None), ("١٢", None), ("12a", None), ("1 2", None),
])
def test_parse_is_absl_simple_atoi_into_int64(name, version):
    assert versions.parse(name) == version


def test_folders_lists_every_child_tf_serving_reads_as_a_version(tmp_path):
    for name in ("2", "0010", ".tmp-11-x", "notes", "001"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file: TF Serving lists it too, and then fails to load it")
    (tmp_path / "1").mkdir()
    assert versions.folders(tmp_path) == {1: tmp_path / "001", 2: tmp_path / "2", 7: tmp_path / "7",
                                          10: tmp_path / "0010"}
    assert versions.folders(tmp_path / "missing") == {}
    assert export.next_version(tmp_path) == 11


def test_a_base_path_of_version_folders_is_one_model_named_default(tmp_path):
    """TF Serving's --model_base_path is one model's folder; --model_name defaults to "default"."""
    (tmp_path / "00000123").mkdir()
    [config] = serve.model_configs(tmp_path, None, None)()
    assert (config.name, config.base_path, config.latest) == ("default", tmp_path, 1)
