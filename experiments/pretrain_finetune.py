"""Pretrain, then fine-tune, on the CPU with the synthetic generator (issue "Own data, mixtures, pretrain then
fine-tune"): does a model pretrained on one synthetic population, without identities and streamed, fine-tune
better on another population than the same fine-tuning from scratch?

Steps (every one is the user's own command: irra-build-shards, accelerate launch launch/train.py, irra-eval):

1. Population A (generator seed 1): its train images and captions written as a JSON-lines file WITHOUT pids,
   built with ``irra-build-shards --dataset jsonl`` (every image its own identity, so the ID loss is off);
   the same population in the CUHK-PEDES layout gives A's test split for the cross-dataset table.
2. Population B: the demo dataset (generator seed 0, 500 train identities), with identities.
3. Pretrain the demo model on A: streamed (``data.mode=stream``), SDM + MLM.
4. Fine-tune on B from the pretraining run (``model.init_from``), and train on B from scratch, with the same
   recipe, steps and seed.
5. ``irra-eval RUN --shards B A`` for both models: the cross-dataset table.

    python experiments/pretrain_finetune.py --out /tmp/pretrain_finetune
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from irra_dist.data.parsers import parse_dataset  # noqa: E402
from irra_dist.data.shards import build_shards  # noqa: E402
from irra_dist.engine.trainer import build_demo_shards  # noqa: E402
from irra_dist.synthetic.dataset import generate_synthetic_dataset  # noqa: E402

IMAGE_SIZE = (96, 32)  # the demo recipe's input size


def run(cmd: list[str], log: Path) -> float:
    """Run one command (its output to `log`), stop the experiment if it fails; returns seconds taken."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    if done.returncode != 0:
        sys.exit(f"failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def population_a(out: Path, num_ids: int) -> tuple[Path, Path]:
    """A's pretraining shards (JSONL, no pids) and its CUHK-layout shards (for its test split)."""
    raw = generate_synthetic_dataset(out / "raw_a" / "CUHK-PEDES", num_train_ids=num_ids, num_val_ids=1,
                                     num_test_ids=100, seed=1, workers=2, overwrite=True)
    parsed = parse_dataset("CUHK-PEDES", raw.parent)
    ann = out / "population_a.jsonl"
    with open(ann, "w") as f:
        for record in parsed.splits["train"]:
            f.write(json.dumps({"image": record.rel_path, "captions": list(record.captions)}) + "\n")
    pretrain = out / "shards_a_noid"
    run(["irra-build-shards", "--dataset", "jsonl", "--ann", str(ann),
         "--images", str(raw / "imgs"), "--out", str(pretrain), "--pre-resize", "96x32",
         "--pre-resize-format",
         "ppm", "--shard-size", "200", "--no-progress", "--overwrite"], out / "build_a.log")
    evaluation = out / "shards_a"
    build_shards(parsed, None, evaluation, pre_resize=IMAGE_SIZE, pre_resize_format="ppm", workers=2,
                 overwrite=True)
    return pretrain, evaluation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/pretrain_finetune"))
    parser.add_argument("--a-ids", type=int, default=1000, help="identities of population A")
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")

    shards_a, eval_a = population_a(out, args.a_ids)
    shards_b = out / "shards_b"
    if not (shards_b / "manifest.json").is_file():
        build_demo_shards(shards_b, IMAGE_SIZE)
    train = ["accelerate", "launch", "--num_processes", "1", "launch/train.py", "--config", "demo",
             "--no-wandb", f"train.output_dir={out / 'runs'}"]
    timings = {}
    timings["pretrain"] = run([*train, "train.run_name=pretrain", f"data.shards={shards_a}",
                               "data.mode=stream",
                               "loss.names=[sdm,mlm]", "eval.eval_period=0",
                               f"train.num_epochs={args.pretrain_epochs}"], out / "pretrain.log")
    finetune = [f"data.shards={shards_b}", f"train.num_epochs={args.finetune_epochs}"]
    timings["finetune"] = run([*train, "train.run_name=finetune", *finetune,
                               f"model.init_from={out / 'runs' / 'pretrain'}"], out / "finetune.log")
    timings["scratch"] = run([*train, "train.run_name=scratch", *finetune], out / "scratch.log")
    results = {}
    for name in ("finetune", "scratch"):
        table = out / f"cross_{name}.json"
        run(["irra-eval", str(out / "runs" / name), "--shards", str(shards_b), str(eval_a),
             "--num-workers", "1",
             "--out", str(table)], out / f"eval_{name}.log")
        results[name] = json.loads(table.read_text())
    print(f"\npretrain {timings['pretrain']:.0f} s, fine-tune {timings['finetune']:.0f} s, "
          f"scratch {timings['scratch']:.0f} s")
    print("| model | test set | R1 | R5 | R10 | mAP | mINP |\n|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for row in rows:
            m = row["metrics"]["t2i"]
            where = "B (fine-tuning set)" if row["shards"] == str(shards_b) else "A (pretraining population)"
            print(f"| {name} | {where} | {m['R1']:.2f} | {m['R5']:.2f} | {m['R10']:.2f} | {m['mAP']:.2f} | "
                  f"{m['mINP']:.2f} |")
    (out / "summary.json").write_text(json.dumps({"timings_s": timings, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
