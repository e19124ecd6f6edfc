"""`fastllava bench`: runs on a tiny preset, writes well-formed output, refuses bad values."""

import json

import pytest

from fastllava.cli import main


def test_bench_tiny_preset_writes_json_table_and_plot(tmp_path, capsys):
    out = tmp_path / "b"
    code = main(["bench", "--preset", "tiny", "--device", "cpu", "--batch-size", "1,2", "--repeats", "1",
                 "--warmup", "0", "--new-tokens", "4", "--compare", "hf", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["model"] == "preset tiny"
    assert {"device", "date", "torch", "fastllava", "command"} <= set(report["environment"])
    assert [(c["batch"], c["visual_tokens"]) for c in report["cases"]] == [(1, 576), (2, 576)]
    for case in report["cases"]:
        ours = case["ours"]
        assert ours["ttft_s"] > 0 and ours["prefill_s"] > 0 and ours["decode_tok_s"] > 0
        assert ours["e2e_s"] >= ours["ttft_s"]
        assert ours["first_run_s"] >= ours["e2e_s"]  # the one run (no warm-up), vision tower timed apart included
        # tiny preset: 2 layers x 2 kv heads x 32 head dim x (5 + 576 + 35 + 4) slots x fp32, keys and values
        assert ours["kv_cache_bytes"] == 2 * case["batch"] * 2 * 620 * 16 * 4 * 2
        assert case["same_tokens"] is True  # transformers got the same weights and inputs
        assert case["ratios"]["e2e"] > 0
    assert (out / "bench.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3 and "HF TTFT ms" in table


def test_bench_reduce_takes_a_spec_with_parameters(tmp_path):
    out = tmp_path / "r"
    code = main(["bench", "--preset", "tiny", "--device", "cpu", "--keep", "576,64", "--reduce", "fastv:layer=1,merge=prop",
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--out", str(out)])
    assert code == 0
    cases = json.loads((out / "bench.json").read_text())["cases"]
    assert [c["reduce"] for c in cases] == [None, "fastv:keep=64,layer=1,rater=all,merge=prop"]


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "invalid choice"),
    (["--preset", "tiny", "--keep", "0"], "positive integers"),
    (["--preset", "tiny", "--batch-size", "two"], "positive integers"),
    (["--preset", "tiny", "--keep", "1000"], "more than the 576 visual tokens"),
    (["--preset", "tiny", "--model", "x"], "not both"),
    (["--preset", "tiny", "--device", "cuda:7"], "cuda"),
    (["--preset", "tiny", "--keep", "64", "--reduce", "fastv:merge=avg"], "merge must be one of"),
    (["--preset", "tiny", "--decode", "eager,fast"], "unknown decode mode 'fast'"),
    (["--preset", "tiny", "--decode", "eager,eager"], "lists a mode twice"),
])
def test_bench_bad_values_are_one_line_errors(args, message, capsys, tmp_path):
    try:
        code = main(["bench", *args, "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse rejects it before the command runs
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("image_token", [3, 100, 255])
def test_bench_inputs_hold_exactly_one_image_per_row(image_token):
    import torch

    from fastllava.bench.measure import Case, bench_inputs
    from fastllava.bench.presets import PRESETS, random_model
    from fastllava.config import LlavaConfig

    cfg = LlavaConfig.from_dict({"model_type": "llava", **PRESETS["tiny"], "image_token_index": image_token})
    model = random_model(cfg, torch.device("cpu"), torch.float32)
    ids, mask, pixels, _ = bench_inputs(model, Case(batch=16, keep=None, text_tokens=40))
    assert ids.shape == (16, 576 + 40) and bool(mask.all()) and pixels.shape == (16, 3, 96, 96)
    assert ((ids == image_token).sum(dim=1) == 576).all()
    assert int(ids.min()) >= 3 and int(ids.max()) < cfg.text.vocab_size


def test_bench_times_several_decode_modes_on_the_same_weights(tmp_path, capsys):
    """--decode eager,static: every case once per mode, the fixed-shape path's greedy tokens
    compared with the eager ones, one table and one plot; --profile: an operator table per case."""
    out = tmp_path / "m"
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--keep", "576,8", "--decode", "eager,static",
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "4", "--profile", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["decode"] == "eager,static"
    assert [(c["decode"], c["visual_tokens"]) for c in report["cases"]] == [
        ("eager", 576), ("eager", 8), ("static", 576), ("static", 8)]
    assert all(c["same_tokens_as_first_decode"] for c in report["cases"])
    table = capsys.readouterr().out
    assert "same tokens as eager" in table and sum(line.startswith("| ") for line in table.splitlines()) == 5
    profiles = sorted(p.name for p in out.glob("profile-*.txt"))  # --profile: one operator table per case
    assert profiles == ["profile-eager-b1-v576.txt", "profile-eager-b1-v8.txt", "profile-static-b1-v576.txt",
                        "profile-static-b1-v8.txt"]
    # a real operator table (the 30 costliest operators by CPU time), not the profiler's failure message;
    # which operators make the top 30 varies from machine to machine, so none is named
    profile_lines = (out / "profile-static-b1-v8.txt").read_text().splitlines()
    assert "Self CPU time total" in profile_lines[-1]
    assert sum(line.strip().startswith("aten::") for line in profile_lines) >= 20
