"""``irra-export RUN|CHECKPOINT --onnx DIR``: the image and text towers as ONNX, checked against PyTorch."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="irra-export",
        description="Export the image and text towers to ONNX (dynamic batch), checked against PyTorch "
                    "(max abs difference reported; at most 1e-4 in fp32). irra-search --runtime onnx and "
                    "irra-serve --runtime onnx use the text tower without the training stack.")
    parser.add_argument("model", metavar="RUN|CHECKPOINT",
                        help="a run folder (config.yaml + weights) or a weights file (.safetensors, "
                             "best.pth)")
    parser.add_argument("--onnx", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--weights", default="best", choices=("best", "last"), help="with a run folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``irra-export``. Returns 0, or 2 on bad input or a failed check (one ``irra-export: error:`` line)."""
    args = _arg_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from irra_dist.config import ConfigError
    from irra_dist.model import CheckpointError
    from irra_dist.model.onnx import OnnxExportError, export_towers
    from irra_dist.retrieval.errors import SearchError
    from irra_dist.retrieval.model import load_search_model, model_section

    source = Path(args.model)
    try:
        loaded = load_search_model(run=source if source.is_dir() else None,
                                   checkpoint=None if source.is_dir() else source, weights=args.weights)
        meta = export_towers(loaded.model, args.onnx, model_meta=model_section(loaded, source, args.weights))
    except (OnnxExportError, SearchError, CheckpointError, ConfigError, OSError) as err:
        print(f"irra-export: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    diffs = meta["max_abs_diff"]
    print(f"wrote {args.onnx}: image_tower.onnx, text_tower.onnx (model {meta['model']['fingerprint']})")
    print(f"max |onnxruntime - PyTorch|: image {diffs['image']:.2e}, text {diffs['text']:.2e} (fp32, "
          "tolerance 1e-4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
