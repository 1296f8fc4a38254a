"""benchmarks/ab_summary.py on synthetic CSVs: one line per configuration and backend, each version's
rounds with their ratio to the reference backend of the same run."""

import pytest

from bench_scripts import load_script, write_csv


@pytest.fixture(scope="module")
def ab_summary():
    return load_script("ab_summary")


def write_bwd_csv(path, rows):
    fields = ["backend", "pass", "dtype", "hdim", "causal", "seqlen", "tflops", "deterministic"]
    write_csv(path, fields, [{"backend": backend, "pass": "bwd", "dtype": "bf16", "hdim": 96, "causal": False,
                              "seqlen": seqlen, "tflops": tflops, "deterministic": det}
                             for backend, seqlen, tflops, det in rows])


def test_versions_and_rounds_side_by_side(ab_summary, tmp_path, capsys):
    write_bwd_csv(tmp_path / "base_1.csv", [("ours", 4096, 90.0, "False"), ("sdpa_flash", 4096, 100.0, "")])
    write_bwd_csv(tmp_path / "try_1.csv", [("ours", 4096, 110.0, "False"), ("sdpa_flash", 4096, 100.0, "")])
    write_bwd_csv(tmp_path / "try_2.csv", [("ours", 4096, 105.0, "True"), ("sdpa_flash", 4096, 105.0, "")])
    assert ab_summary.main([str(tmp_path), "base", "try"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    plain = next(line for line in lines if " ours " in line)
    assert "base/1: 90.0 (0.900)" in plain and "try/1: 110.0 (1.100)" in plain and "try/2" not in plain
    det = next(line for line in lines if "ours det" in line)
    assert "try/2: 105.0 (1.000)" in det


def test_usage_without_arguments(ab_summary, capsys):
    assert ab_summary.main([]) == 2
    assert "ab_summary.py FOLDER NAME" in capsys.readouterr().out
