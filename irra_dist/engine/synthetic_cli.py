"""``python -m irra_dist.engine.synthetic_cli``: write the synthetic person dataset (CUHK-PEDES layout).

The generator itself is :func:`irra_dist.synthetic.dataset.generate_synthetic_dataset`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from irra_dist.synthetic.dataset import generate_synthetic_dataset


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generate the synthetic dataset (see :mod:`irra_dist.synthetic.dataset`)."""
    parser = argparse.ArgumentParser(prog="python -m irra_dist.engine.synthetic_cli",
                                     description="Write the synthetic person dataset (CUHK-PEDES layout).")
    parser.add_argument("--out", required=True, help="dataset folder to create")
    parser.add_argument("--train-ids", type=int, default=500)
    parser.add_argument("--val-ids", type=int, default=100)
    parser.add_argument("--test-ids", type=int, default=100)
    parser.add_argument("--images-per-id", type=int, nargs=2, default=(2, 4), metavar=("MIN", "MAX"))
    parser.add_argument("--captions-per-image", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        generate_synthetic_dataset(args.out, num_train_ids=args.train_ids, num_val_ids=args.val_ids,
                                   num_test_ids=args.test_ids, images_per_id=tuple(args.images_per_id),
                                   captions_per_image=args.captions_per_image, seed=args.seed,
                                   workers=args.workers, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
