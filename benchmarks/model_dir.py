"""Writes the model folder the device scripts serve: L8 as a config-only folder (dummy weights) or, for the CPU
rehearsals, a tiny Llama config; with the small test tokenizer either way (prompts are token ids). Prints the
folder.

    python benchmarks/model_dir.py WORK_DIR                       # L8
    python benchmarks/model_dir.py WORK_DIR --tiny [--max-position-embeddings 4096]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sluice.bench.shapes import write_l8_config  # noqa: E402
from tests.tiny_models import build_tokenizer, tiny_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work_dir")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama instead of L8")
    parser.add_argument("--max-position-embeddings", type=int, default=2048, help="the tiny model's context")
    args = parser.parse_args()
    if args.tiny:
        folder = os.path.join(args.work_dir, "tiny")
        tiny_config("llama", max_position_embeddings=args.max_position_embeddings).save_pretrained(folder)
    else:
        folder = write_l8_config(args.work_dir)
    build_tokenizer().save_pretrained(folder)
    print(folder)


if __name__ == "__main__":
    main()
