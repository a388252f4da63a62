"""Build the quickstart's demo assets: synthetic coded notes and a tiny pre-trained Llama base.

Run as:
    python scripts/make_demo_assets.py            # demo/medical_coding/*.jsonl and demo/tiny-llama-icd10/
    python scripts/make_demo_assets.py --force    # rebuild even if present

Deterministic: the same package versions give the same files. Takes about a minute on 2 CPU cores.
"""

import argparse
import time

from pipeline.demo import build_demo_assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="demo", help="output folder (default: demo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the assets exist")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="also the OpenAI migration demo: demo/support_desk/ and demo/tiny-llama-chat/ "
        "(recipes/openai_migration_quickstart.yaml)",
    )
    args = parser.parse_args()
    start = time.time()
    paths = build_demo_assets(args.root, force=args.force, chat=args.chat)
    shown = ", ".join(f"{name} {path}" for name, path in paths.items())
    print(f"Demo assets ready in {time.time() - start:.0f}s: {shown}")


if __name__ == "__main__":
    main()
