"""benchmarks/det_cost.py on synthetic CSVs: deterministic time over default time, per configuration present
in both files, and the count above the 15% bar."""

import pytest

from bench_scripts import load_script, write_csv


@pytest.fixture(scope="module")
def det_cost():
    return load_script("det_cost")


FIELDS = ["backend", "pass", "dtype", "hdim", "causal", "seqlen", "ms", "deterministic"]


def rows(det, times):
    return [{"backend": backend, "pass": "bwd", "dtype": "bf16", "hdim": 128, "causal": causal, "seqlen": seqlen,
             "ms": ms, "deterministic": ("True" if backend == "ours_det" else det) if backend.startswith("ours") else ""}
            for backend, causal, seqlen, ms in times]


def test_ratio_per_config_and_count_over_the_bar(det_cost, tmp_path, capsys):
    write_csv(tmp_path / "bwd.csv", FIELDS, rows("False", [("ours", False, 2048, 2.0), ("sdpa_flash", False, 2048, 9.0),
                                                           ("ours", True, 2048, 1.0), ("ours", False, 4096, 4.0)]))
    write_csv(tmp_path / "det.csv", FIELDS, rows("True", [("ours", False, 2048, 2.5), ("ours", True, 2048, 1.1)]))
    assert det_cost.main([str(tmp_path / "bwd.csv"), str(tmp_path / "det.csv")]) == 0
    out = capsys.readouterr().out
    assert "bf16 128 False 2048 2.0000 1.250" in out and "bf16 128 True 2048 1.0000 1.100" in out
    assert "4096" not in out  # no deterministic time for it
    assert "det: min 1.100 max 1.250 over 2; 1 above 1.15" in out


def test_default_rows_in_the_det_file_are_not_mistaken_for_deterministic(det_cost, tmp_path, capsys):
    write_csv(tmp_path / "bwd.csv", FIELDS, rows("False", [("ours", False, 2048, 2.0)]))
    write_csv(tmp_path / "det.csv", FIELDS, rows("False", [("ours", False, 2048, 2.5)]))
    assert det_cost.main([str(tmp_path / "bwd.csv"), str(tmp_path / "det.csv")]) == 1
    assert "no config in both files" in capsys.readouterr().out


def test_one_csv_with_ours_det_rows(det_cost, tmp_path, capsys):
    write_csv(tmp_path / "bwd.csv", FIELDS, rows("False", [("ours", False, 2048, 2.0), ("ours_det", False, 2048, 2.2),
                                                           ("sdpa_flash", False, 2048, 9.0), ("ours", True, 2048, 1.0),
                                                           ("ours_det", True, 2048, 1.2)]))
    assert det_cost.main([str(tmp_path / "bwd.csv")]) == 0
    out = capsys.readouterr().out
    assert "bf16 128 False 2048 2.0000 1.100" in out and "bf16 128 True 2048 1.0000 1.200" in out
    assert "det: min 1.100 max 1.200 over 2; 1 above 1.15" in out


def test_usage_without_arguments(det_cost, capsys):
    assert det_cost.main([]) == 2
    assert "det_cost.py bwd.csv det.csv" in capsys.readouterr().out
