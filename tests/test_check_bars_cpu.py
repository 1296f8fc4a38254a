"""benchmarks/check_bars.py on a synthetic CSV: which configs it calls below their bar, and its exit status."""

import pytest

from bench_scripts import load_script, write_csv


@pytest.fixture(scope="module")
def check_bars():
    return load_script("check_bars")


def write_attention_csv(path, rows):
    fields = ["backend", "pass", "dtype", "hdim", "causal", "seqlen", "tflops", "modifier"]
    write_csv(path, fields, [dict(backend=backend, **{"pass": "fwd"}, dtype="bf16", hdim=hdim, causal=causal,
                                  seqlen=seqlen, tflops=tflops, modifier="")
                             for backend, hdim, causal, seqlen, tflops in rows])


def test_reports_only_configs_below_their_bar(check_bars, tmp_path, capsys):
    path = tmp_path / "run.csv"
    write_attention_csv(path, [
        ("ours", 128, True, 1024, 99.0), ("sdpa_flash", 128, True, 1024, 100.0),    # 0.99 < 1.0: miss
        ("ours", 128, False, 4096, 101.0), ("sdpa_flash", 128, False, 4096, 100.0),  # met
        ("ours", 256, True, 2048, 91.0), ("sdpa_flash", 256, True, 2048, 100.0),     # 0.91 >= 0.9: met
        ("ours", 96, True, 1024, 80.0), ("sdpa_flash", 96, True, 1024, 100.0),       # 0.80 < 0.9: miss
        ("ours", 64, False, 512, 50.0), ("sdpa_flash", 64, False, 512, 100.0),       # below 1k: not a bar
    ])
    assert check_bars.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "hdim 128 causal seqlen 1024: 0.990" in out and "hdim 96 causal seqlen 1024: 0.800" in out
    assert "hdim 256" not in out and "seqlen 512" not in out and "seqlen 4096" not in out
    assert "4 configs checked, 2 below their bar" in out


def test_passes_when_every_config_meets_its_bar(check_bars, tmp_path):
    path = tmp_path / "run.csv"
    write_attention_csv(path, [("ours", 64, True, 16384, 300.0), ("sdpa_flash", 64, True, 16384, 290.0)])
    assert check_bars.main([str(path)]) == 0
    assert check_bars.main([str(path), "--pass", "bwd"]) == 1  # nothing of that pass: nothing checked


def test_decode_bars(check_bars, tmp_path, capsys):
    path = tmp_path / "decode.csv"
    fields = ["backend", "batch", "seqlen_cache", "ms", "tb_per_s", "fraction_of_copy", "ratio_vs_sdpa", "note"]
    rows = [
        ("ours_dense", 64, 4096, 0.95, 1.01),  # both bars met
        ("ours_paged", 64, 4096, 0.79, 0.90),  # below 80% of copy; paged rows have no SDPA bar
        ("ours_dense_graph", 1, 4096, 0.85, 0.75),  # slower than SDPA
        ("sdpa_cudnn", 1, 4096, 0.99, 1.0),  # not ours: not checked
    ]
    write_csv(path, fields, [dict(backend=backend, batch=batch, seqlen_cache=seqlen, ms=1.0, tb_per_s=1.0,
                                  fraction_of_copy=fraction, ratio_vs_sdpa=ratio, note="")
                             for backend, batch, seqlen, fraction, ratio in rows])
    assert check_bars.main([str(path), "--pass", "decode"]) == 1
    out = capsys.readouterr().out
    assert "ours_paged batch 64 cache 4096: 79.0% of copy" in out
    assert "ours_dense_graph batch 1 cache 4096: 0.750 x SDPA" in out
    assert "ours_dense batch 64" not in out and "sdpa_cudnn" not in out
    assert "3 configs checked, 2 bars missed" in out


def test_decode_miss_shows_the_same_work_ratio(check_bars, tmp_path, capsys):
    path = tmp_path / "decode.csv"
    fields = ["backend", "batch", "seqlen_cache", "ms", "tb_per_s", "fraction_of_copy", "ratio_vs_sdpa",
              "ratio_same_work", "note"]
    rows = [
        ("ours_dense_graph", 1, 4096, 0.85, 0.88, 1.07),  # whole step: misses SDPA alone, not SDPA + append
        ("ours_dense_attn_graph", 1, 4096, 0.85, 0.97, 0.97),  # attention alone: one ratio
    ]
    write_csv(path, fields, [dict(backend=backend, batch=batch, seqlen_cache=seqlen, ms=1.0, tb_per_s=1.0,
                                  fraction_of_copy=fraction, ratio_vs_sdpa=ratio, ratio_same_work=same, note="")
                             for backend, batch, seqlen, fraction, ratio, same in rows])
    assert check_bars.main([str(path), "--pass", "decode"]) == 1
    out = capsys.readouterr().out
    assert "ours_dense_graph batch 1 cache 4096: 0.880 x SDPA < 1.0 (against SDPA with the append too: 1.070)" in out
    assert "ours_dense_attn_graph batch 1 cache 4096: 0.970 x SDPA < 1.0\n" in out
    assert "2 configs checked, 2 bars missed" in out
