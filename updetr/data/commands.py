"""`updetr data ...` subcommands: `shard` (folder -> tar shards + manifest) and `synth` (synthetic datasets)."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from updetr.data.skips import SkipCounter

log = logging.getLogger("updetr.data")


def _cmd_shard(args: argparse.Namespace) -> int:
    import os

    from updetr.data.shards import iter_image_files, write_shards

    counter = SkipCounter()
    t0 = time.time()
    # Refuse an empty or missing source before anything is written: a manifest means "complete shard set".
    if not os.path.isdir(args.src_dir):
        print(f"updetr data shard: error: {args.src_dir}: not found or not a folder", file=sys.stderr)
        return 2
    if next(iter(iter_image_files(args.src_dir)), None) is None:
        print(f"updetr data shard: error: {args.src_dir}: no image files under it; nothing written",
              file=sys.stderr)
        return 1
    try:
        manifest = write_shards(args.src_dir, args.out_dir, shard_size=args.shard_size, counter=counter,
                                progress_every=args.progress_every, seed=None if args.path_order else args.seed)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"updetr data shard: error: {e}", file=sys.stderr)
        return 2
    dt = time.time() - t0
    print(f"wrote {manifest['count']} images ({manifest['bytes'] / 1e6:.1f} MB) into {len(manifest['shards'])} "
          f"shard(s) under {args.out_dir} in {dt:.1f}s ({manifest['count'] / max(dt, 1e-9):.0f} img/s)")
    if counter:
        print(counter.summary("shard"))
    if manifest["count"] == 0:
        print(f"updetr data shard: error: no image files under {args.src_dir}", file=sys.stderr)
        return 1
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from updetr.data import synthetic

    if args.kind == "images":
        rels = synthetic.write_image_folder(args.out_dir, args.n, seed=args.seed,
                                            size_range=(args.min_size, args.max_size))
        print(f"wrote {len(rels)} images under {args.out_dir}")
    elif args.kind == "coco":
        for split, n in (("train", args.n), ("val", max(1, args.n // 4))):
            img_dir, ann = synthetic.write_coco_dataset(args.out_dir, n, seed=args.seed, split=split,
                                                        size_range=(args.min_size, args.max_size))
            print(f"wrote {n} images in {img_dir} and {ann}")
    elif args.kind == "panoptic":
        from updetr.data.synthetic_panoptic import write_panoptic_dataset

        for split, n in (("train", args.n), ("val", max(1, args.n // 4))):
            img_dir, ann, png_dir = write_panoptic_dataset(args.out_dir, n, seed=args.seed, split=split,
                                                           size_range=(args.min_size, args.max_size))
            print(f"wrote {n} images in {img_dir}, segment PNGs in {png_dir} and {ann}")
    else:
        base = synthetic.write_voc_dataset(args.out_dir, n_trainval=args.n, n_test=max(1, args.n // 4),
                                           seed=args.seed, size_range=(args.min_size, args.max_size))
        print(f"wrote a VOC layout under {base}")
    return 0


def register(subparsers) -> None:
    """Add `data shard` and `data synth` to the top-level argparse subparsers; each sets `func(args) -> int`."""
    p = subparsers.add_parser("data", help="data tools: shard a folder, write synthetic datasets")
    sub = p.add_subparsers(dest="data_command", metavar="{shard,synth}")
    sub.required = True

    s = sub.add_parser("shard", help="stream an image folder (any nesting) into WebDataset tar shards",
                       description="Copy every image under SRC_DIR (recursive) into OUT_DIR/shard-NNNNNN.tar "
                                   "(members <key>.image + <key>.path) and write OUT_DIR/manifest.json. "
                                   "Memory stays flat; images are copied, not re-encoded.")
    s.add_argument("src_dir", help="image folder, e.g. ImageNet train/")
    s.add_argument("out_dir", help="output folder for shard-*.tar and manifest.json")
    s.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    s.add_argument("--progress-every", type=int, default=10000, help="log progress every N images (0: off)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random image order (recorded in the manifest)")
    s.add_argument("--path-order", action="store_true",
                   help="write in sorted path order instead (shards of a class-sorted folder then hold few classes)")
    s.set_defaults(func=_cmd_shard)

    y = sub.add_parser("synth", help="write a synthetic dataset (images folder, COCO, COCO panoptic or VOC layout)")
    y.add_argument("out_dir")
    y.add_argument("--kind", choices=("images", "coco", "panoptic", "voc"), default="images")
    y.add_argument("--n", type=int, default=64, help="images (train split for coco / panoptic / voc)")
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--min-size", type=int, default=96)
    y.add_argument("--max-size", type=int, default=160)
    y.set_defaults(func=_cmd_synth)


def main(argv=None) -> int:
    """Standalone entry (`python -m updetr.data.commands shard SRC OUT`), for use without the main CLI."""
    parser = argparse.ArgumentParser(prog="updetr")
    top = parser.add_subparsers(dest="command")
    register(top)
    args = parser.parse_args(["data"] + list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
