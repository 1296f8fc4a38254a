"""benchmarks/decode_variants_summary.py on synthetic CSVs: a column per variant and run, a line per config and
row of ours, the geometric means of the dense and paged rows."""

import math

import pytest

from bench_scripts import load_script, write_csv

FIELDS = ["backend", "batch", "seqlen_cache", "ms", "tb_per_s", "fraction_of_copy", "ratio_vs_sdpa",
          "ratio_same_work", "note"]


@pytest.fixture(scope="module")
def summary():
    return load_script("decode_variants_summary")


def write_run(path, dense, paged):
    rows = []
    for (batch, cache), ratio in dense.items():
        rows.append(dict(backend="ours_dense_attn", batch=batch, seqlen_cache=cache, ratio_vs_sdpa=ratio))
        rows.append(dict(backend="sdpa_cudnn", batch=batch, seqlen_cache=cache, ratio_vs_sdpa=1.0))
    for (batch, cache), ratio in paged.items():
        rows.append(dict(backend="ours_paged_attn", batch=batch, seqlen_cache=cache, ratio_vs_sdpa=ratio))
    write_csv(path, FIELDS, rows)


def test_columns_rows_and_means(summary, tmp_path, capsys):
    write_run(tmp_path / "main_1.csv", {(1, 4096): 0.98, (8, 32768): 0.99}, {(1, 4096): 0.97})
    write_run(tmp_path / "main_read.csv", {(1, 4096): 1.01, (8, 32768): 1.0}, {})
    write_run(tmp_path / "ef_1.csv", {(1, 4096): 1.02, (8, 32768): 1.03}, {(1, 4096): 1.0})
    write_run(tmp_path / "main2_1.csv", {(1, 4096): 0.5}, {})  # another variant's run: not main's
    assert summary.main([str(tmp_path), "main", "ef"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-3:] == ["main_1", "main_read", "ef_1"]
    dense = next(line for line in lines if line.startswith("ours_dense_attn ") and " 4096 " in line)
    assert dense.split()[-3:] == ["0.980", "1.010", "1.020"]
    paged = next(line for line in lines if line.startswith("ours_paged_attn "))
    assert paged.split()[-3:] == ["0.970", "nan", "1.000"]
    means = next(line for line in lines if line.startswith("geomean ours_dense_attn"))
    assert [float(x) for x in means.split()[-3:]] == pytest.approx(
        [math.sqrt(0.98 * 0.99), math.sqrt(1.01 * 1.0), math.sqrt(1.02 * 1.03)], abs=1e-3)


def test_usage_without_arguments(summary, capsys):
    assert summary.main([]) == 2
    assert "decode_variants_summary.py FOLDER NAME" in capsys.readouterr().out
