"""benchmarks/ab_summary.py on synthetic CSVs: one line per configuration and backend, each version's
rounds with their ratio to the reference backend of the same run."""

import csv
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ab_summary():
    spec = importlib.util.spec_from_file_location("ab_summary", os.path.join(ROOT, "benchmarks", "ab_summary.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_csv(path, rows):
    fields = ["backend", "pass", "dtype", "hdim", "causal", "seqlen", "tflops", "deterministic"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for backend, seqlen, tflops, det in rows:
            writer.writerow({"backend": backend, "pass": "bwd", "dtype": "bf16", "hdim": 96, "causal": False,
                             "seqlen": seqlen, "tflops": tflops, "deterministic": det})


def test_versions_and_rounds_side_by_side(ab_summary, tmp_path, capsys):
    write_csv(tmp_path / "base_1.csv", [("ours", 4096, 90.0, "False"), ("sdpa_flash", 4096, 100.0, "")])
    write_csv(tmp_path / "try_1.csv", [("ours", 4096, 110.0, "False"), ("sdpa_flash", 4096, 100.0, "")])
    write_csv(tmp_path / "try_2.csv", [("ours", 4096, 105.0, "True"), ("sdpa_flash", 4096, 105.0, "")])
    assert ab_summary.main([str(tmp_path), "base", "try"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    plain = next(line for line in lines if " ours " in line)
    assert "base/1: 90.0 (0.900)" in plain and "try/1: 110.0 (1.100)" in plain and "try/2" not in plain
    det = next(line for line in lines if "ours det" in line)
    assert "try/2: 105.0 (1.000)" in det


def test_usage_without_arguments(ab_summary, capsys):
    assert ab_summary.main([]) == 2
    assert "ab_summary.py FOLDER NAME" in capsys.readouterr().out
