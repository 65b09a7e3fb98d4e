"""The benchmark tooling: FLOP counts against hand-written sums and PyTorch's own counter, the shared
command line and table (bench/common.py), run_all's failure handling, and smoke runs of
`bench/run_all.py --quick` and `bench/gpu_step.py --dry-run`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import flops  # noqa: E402
import run_all  # noqa: E402

# A tiny shape whose MACs are written out by hand below: 2 patches (3 image tokens), 5 text tokens.
TINY = flops.IrraShape(image_size=(8, 4), patch_size=4, stride_size=4, vision_width=8, vision_layers=1,
                       embed_dim=4, context_length=5, text_width=8, text_layers=1, vocab_size=10, cmt_depth=1,
                       num_classes=3)


# ---------------------------------------------------------------------------------------------------------
# FLOP count


def test_linear_macs_is_tokens_times_weight_size():
    assert flops.linear_macs(10, 3, 4) == 120


def test_self_attention_block_macs_by_hand():
    # N = 5 tokens, width 8, MLP 8 -> 32 -> 8:
    # q, k, v 3*5*8*8 = 960; QK^T 5*5*8 = 200; AV 200; out 5*8*8 = 320; MLP 5*8*32 + 5*32*8 = 2560.
    assert flops.block_macs(5, 8) == 960 + 200 + 200 + 320 + 2560


def test_cross_attention_macs_by_hand():
    # 3 queries, 7 keys, width 4: q 3*16; k, v 2*7*16; QK^T 3*7*4; AV 3*7*4; out 3*16.
    assert flops.attention_macs(3, 7, 4) == 48 + 224 + 84 + 84 + 48


def test_patch_grid_follows_the_official_stride_formula():
    assert flops.IrraShape().num_patches == 24 * 8
    overlapping = flops.IrraShape(stride_size=12)
    assert overlapping.num_patches == ((384 - 16) // 12 + 1) * ((128 - 16) // 12 + 1) == 31 * 10


def test_tiny_irra_forward_macs_by_hand():
    # image: patch conv 2*(3*4*4)*8 = 768; block N=3 d=8: 3*3*64 + 2*(3*3*8) + 3*64 + 2*(3*8*32) = 2448;
    #        projection of all 3 tokens 3*8*4 = 96                          -> 3312 per image
    # text:  block N=5 d=8: 3*5*64 + 2*(5*5*8) + 5*64 + 2*(5*8*32) = 4240; projection 5*8*4 = 160 -> 4400
    # cross: attention 5 queries x 3 keys, d=4: 5*16 + 2*3*16 + 2*(5*3*4) + 5*16 = 376;
    #        one block N=5 d=4: 3*5*16 + 2*(5*5*4) + 5*16 + 2*(5*4*16) = 1160  -> 1536 per caption
    # MLM head at 3 positions: 3*(4*4 + 4*10) = 168; classifier 2 samples x 2 modalities x 4*3 = 48
    macs = flops.forward_macs(TINY, 2, mlm_positions=3)
    assert macs == {"image_tower": 2 * 3312, "text_tower": 2 * 4400, "cross_modal": 2 * 1536,
                    "mlm_head": 168, "classifier": 48}
    assert flops.training_flops(macs)["total"] == 6 * (2 * 3312 + 2 * 4400 + 2 * 1536 + 168 + 48)


def test_naive_variant_pays_a_second_text_pass_and_the_head_at_every_position():
    lean = flops.forward_macs(TINY, 2, mlm_positions=3)
    naive = flops.forward_macs(TINY, 2, mlm_positions=2 * 5, text_passes=2)
    assert naive["text_tower"] == 2 * lean["text_tower"]
    assert naive["mlm_head"] == 10 * (4 * 4 + 4 * 10)
    assert naive["image_tower"] == lean["image_tower"] and naive["cross_modal"] == lean["cross_modal"]


def test_expected_masked_tokens_is_fifteen_percent_with_at_least_one():
    assert flops.expected_masked_tokens(20) == pytest.approx(3.0)
    assert flops.expected_masked_tokens(2) == 1.0


def test_gpu_step_paper_setup_has_the_paper_shape():
    import gpu_step

    # IrraShape's defaults are the paper's ViT-B/16 model on CUHK-PEDES, written out in flops.py.
    assert gpu_step.paper_setup().shape == flops.IrraShape()
    tiny = gpu_step.dry_run_setup().shape
    assert (tiny.vision_width, tiny.text_layers, tiny.num_patches, tiny.vocab_size) == (32, 1, 8, 49408)


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 3090", 71.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", None), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_table_matches_whole_words(name, tflops):
    assert flops.peak_bf16_tflops(name) == tflops


@pytest.mark.parametrize("masked_only", [True, False])
def test_count_equals_pytorch_flop_counter_on_the_real_model(masked_only):
    """Independent reference: torch.utils.flop_counter over the real model's matmuls and convolution.

    The explicit-softmax attention is used because the counter does not see the CPU's fused SDPA kernel.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from irra_dist.model import build_irra

    torch.manual_seed(0)
    model = build_irra(5, cmt_depth=1, attn_impl="math", mlm_logits_at_masked_only=masked_only,
                       embed_dim=16, image_size=(16, 8), patch_size=4,
                       stride_size=4, vision_width=16, vision_layers=1, vision_heads=2, text_width=16,
                       text_heads=2, text_layers=1)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[:, 0], ids[:, 1:6], ids[:, 6] = 49406, torch.randint(1, 49405, (2, 5)), 49407
    labels = torch.zeros_like(ids)
    labels[0, 2], labels[1, 3], labels[1, 4] = ids[0, 2], ids[1, 3], ids[1, 4]
    batch = {"images": torch.randn(2, 3, 16, 8), "caption_ids": ids, "mlm_labels": labels,
             "pids": torch.tensor([0, 1])}
    if not masked_only:
        batch["mlm_ids"] = ids  # clean and masked captions apart: a second text-tower pass
    shape = flops.IrraShape(image_size=(16, 8), patch_size=4, stride_size=4, vision_width=16, vision_layers=1,
                            embed_dim=16, text_width=16, text_layers=1, cmt_depth=1, num_classes=5)
    macs = flops.forward_macs(shape, 2, mlm_positions=3 if masked_only else 2 * 77,
                              text_passes=1 if masked_only else 2)

    with FlopCounterMode(display=False) as forward_counter:
        out = model(batch)
    assert forward_counter.get_total_flops() == 2 * sum(macs.values())
    with FlopCounterMode(display=False) as backward_counter:
        (out["mlm_logits"].sum() + out["image_logits"].sum() + out["text_logits"].sum()).backward()
    measured = forward_counter.get_total_flops() + backward_counter.get_total_flops()
    # 3x forward, less the patch convolution's unneeded input gradient (the stated over-count).
    assert measured == pytest.approx(flops.training_flops(macs)["total"], rel=0.01)


# ---------------------------------------------------------------------------------------------------------
# common: the shared command line, table and workers

ROW = {"name": "x", "value": 2.0, "unit": "s", "baseline": 4.0, "ratio": 2.0}


def test_format_table_by_hand():
    rows = [{"name": "a", "value": 1.5, "unit": "s", "baseline": 3.0, "ratio": 2.0, "method": "m"},
            {"name": "bb", "value": 12345.6, "unit": "MiB", "baseline": None, "ratio": None}]
    assert common.format_table(rows, extra=("method",), labels={"value": "ours"}).splitlines() == [
        "metric       ours  unit  baseline  ratio  method",
        "------  ---------  ----  --------  -----  ------",
        "a             1.5  s            3     x2  m",
        "bb      1.235e+04  MiB          -      -  -",
    ]


def test_bench_main_passes_options_by_name_and_writes_json_atomically(tmp_path, capsys):
    calls = []

    def run(quick, threads=1, workdir=None):
        calls.append((quick, threads, workdir))
        return [ROW]

    out = tmp_path / "new" / "rows.json"
    options = [("--threads", {"type": int, "default": 1}), ("--dir", {"dest": "workdir"})]
    argv = ["--quick", "--threads", "3", "--dir", "d", "--json", str(out)]
    assert common.bench_main(run, "Title.\n\nMore.", argv, extra_args=options, labels={"baseline": "target"},
                             footer=lambda rows: f"{len(rows)} row(s)") == 0
    assert calls == [(True, 3, "d")]
    assert json.loads(out.read_text()) == [ROW]
    assert [p.name for p in out.parent.iterdir()] == ["rows.json"], "temporary file left behind"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["metric", "value", "unit", "target", "ratio"]
    assert printed[2].split() == ["x", "2", "s", "4", "x2"] and printed[3] == "1 row(s)"

    common.bench_main(run, "Title.", [], extra_args=options)
    assert calls[-1] == (False, 1, None)


def test_bench_main_serves_the_worker_command_line(tmp_path):
    out = tmp_path / "result.json"

    def run(quick):
        raise AssertionError("the worker command line must not run the benchmark")

    argv = [common.WORKER_FLAG, "a", "7", str(out)]
    assert common.bench_main(run, "Title.", argv, worker=lambda args: {"args": args}) == 0
    assert json.loads(out.read_text()) == {"args": ["a", "7"]}


def test_measure_in_subprocess_returns_what_a_fresh_worker_wrote(tmp_path):
    script = tmp_path / "bench_fake.py"
    script.write_text(
        "import os, sys\n"
        "from common import bench_main\n"
        "worker = lambda args: {'sum': sum(map(int, args)), 'pid': os.getpid(), 'env': os.environ['FAKE']}\n"
        "sys.exit(bench_main(None, 'Fake.', worker=worker))\n")
    result = common.measure_in_subprocess(script, ["2", "3"], env={"FAKE": "set"})
    assert result["sum"] == 5 and result["env"] == "set" and result["pid"] != os.getpid()


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc")
def test_peak_rss_growth_sees_a_touched_allocation():
    size = 64 * 2**20
    base = common.reset_peak_rss()
    block = b"\x01" * size  # written, so every page is resident
    growth = common.peak_rss_growth(base)
    assert len(block) == size
    assert 0.9 * size <= growth <= 2 * size


# Every bench module's own options, beside --quick and --json.
MODULE_OPTIONS = {"bench_data": [], "bench_gradcache": ["--threads", "--no-projection"],
                  "bench_index": ["--sizes", "--threads", "--parts"],
                  "bench_metrics": ["--device", "--baseline-max-gib"],
                  "bench_model_step": ["--threads"], "bench_search": [], "bench_synthetic": ["--dir"],
                  "bench_text_optim": [], "bench_threads": [], "bench_train": []}


@pytest.mark.parametrize("name", sorted(MODULE_OPTIONS))
def test_bench_module_command_line_offers_its_options(name, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # as run_all imports it (dataclasses look it up)
    spec.loader.exec_module(module)
    assert callable(module.run)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ["--quick", "--json", *MODULE_OPTIONS[name]]:
        assert option in help_text


def test_module_list_is_complete():
    assert set(MODULE_OPTIONS) == set(run_all.discover())


# ---------------------------------------------------------------------------------------------------------
# run_all


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _module_returning(row: str) -> str:
    return f"def run(quick):\n    return [{row}]\n"


def test_run_all_reports_failed_modules_as_rows_and_exits_nonzero(tmp_path):
    _write(tmp_path / "bench_good.py", _module_returning(
        "{'name': 'x', 'value': 2.0, 'unit': 's', 'baseline': 4.0, 'ratio': 2.0, 'quick': quick}"))
    _write(tmp_path / "bench_raises.py", "def run(quick):\n    raise RuntimeError('boom')\n")
    _write(tmp_path / "bench_hangs.py", "import time\ndef run(quick):\n    time.sleep(60)\n")
    _write(tmp_path / "bench_bad_rows.py", _module_returning("{'name': 'x', 'value': 1.0}"))
    out = tmp_path / "out.json"
    code = run_all.main(["--bench-dir", str(tmp_path), "--quick", "--timeout", "3", "--json", str(out)])
    assert code == 1
    result = json.loads(out.read_text())
    by_module = {r["benchmark"]: r for r in result["rows"]}
    assert set(by_module) == {"bench_good", "bench_raises", "bench_hangs", "bench_bad_rows"}
    assert by_module["bench_good"]["value"] == 2.0 and by_module["bench_good"]["quick"] is True
    assert not by_module["bench_good"].get("failed")
    assert "boom" in by_module["bench_raises"]["error"] and by_module["bench_raises"]["failed"]
    assert "timed out" in by_module["bench_hangs"]["error"]
    assert "lacks the keys" in by_module["bench_bad_rows"]["error"]
    assert result["machine"]["cpu_cores"] >= 1 and result["quick"] is True
    assert not list(tmp_path.glob(".out.json.*")), "temporary file left behind"


def test_run_all_only_selects_by_short_name_and_rejects_unknown(tmp_path):
    for name in ("bench_a", "bench_b"):
        _write(tmp_path / f"{name}.py", _module_returning(
            "{'name': 'x', 'value': 1, 'unit': '', 'baseline': None, 'ratio': None}"))
    out = tmp_path / "out.json"
    assert run_all.main(["--bench-dir", str(tmp_path), "--only", "b", "--json", str(out)]) == 0
    assert [r["benchmark"] for r in json.loads(out.read_text())["rows"]] == ["bench_b"]
    with pytest.raises(run_all.BenchSelectionError, match="choose from bench_a, bench_b"):
        run_all.select(run_all.discover(tmp_path), ["nope"], gpu=False, bench_dir=tmp_path)


# The rows of a full run (written out from the module docstrings), for the modules whose row names do not
# depend on the problem size.
FULL_RUN_ROWS = {
    "bench_data": [f"shard build, {fmt}, {w} worker(s)" for w in (1, 2)
                   for fmt in ("original JPEG", "pre-resized PNG", "pre-resized PPM")]
    + [f"train pipeline, shards of {fmt}, 0 workers" for fmt in ("original JPEG", "pre-resized PNG",
                                                                    "pre-resized PPM")]
    + ["shard build, original JPEG, 1 worker, webdataset TarWriter vs a897f61"]
    + [f"train pipeline, {r}, 0 workers, vs a897f61 reader" for r in ("wids reader", "streaming mode",
                                                                       "wids reader, HTTP-cached")],
    "bench_model_step": ["train step fwd+bwd (median)", "train step peak activations",
                         "MLM head fwd+bwd peak", "MLM logits size (analytic)", "MLM head fwd+bwd time"],
    "bench_synthetic": ["generate, 1 worker(s), wall clock", "generate, 1 worker, process CPU time",
                        "generate, 2 worker(s), wall clock"],
    "bench_train": ["demo model, 1 process, default threads", "demo model, 1 process, 1 thread",
                    "demo model, 2 processes (DDP, gloo), 1 thread each"],
}


@pytest.mark.slow
def test_run_all_quick_covers_every_bench_module(tmp_path):
    modules = run_all.discover()
    if not modules:
        pytest.skip("no bench/bench_*.py module yet")
    out = tmp_path / "latest.json"
    proc = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)
    assert out.exists(), proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    failed = [(r["benchmark"], r["error"]) for r in rows if r.get("failed")]
    assert not failed, failed
    assert {r["benchmark"] for r in rows} == set(modules)
    # Modules whose quick run is reduced in size only: every row of the full run is there.
    for module, names in FULL_RUN_ROWS.items():
        assert [r["name"] for r in rows if r["benchmark"] == module] == names, module
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------
# gpu_step


@pytest.mark.slow
def test_gpu_step_dry_run_completes_and_writes_rows(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_step.py"), "--dry-run", "--peak-tflops", "1",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    for name in ("train_samples_per_s", "train_mfu", "eval_encode_image", "eval_encode_text",
                 "train_gflop_per_sample_total"):
        assert rows[name]["value"] > 0 and rows[name]["baseline"] > 0
    # The naive variant does strictly more work: a second text pass and the head at every position.
    assert rows["train_gflop_per_sample_total"]["baseline"] > rows["train_gflop_per_sample_total"]["value"]
