"""Stage 'task_embeddings' (spec §2.3): one suite's task instructions embedded once, to `.npz`.

    python -m ript.data.task_embeddings --suite libero_goal --encoder minilm --out <file>.npz

The encoders and the file format are in `ript.data.language`; later stages read the file.
"""

from __future__ import annotations

import argparse
import os

from ript.data.language import ENCODERS, SUITES, embed, suite_languages, write_embeddings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Embed a LIBERO suite's task instructions (§2.3).")
    p.add_argument("--suite", required=True, help=f"LIBERO suite, e.g. {', '.join(SUITES)}")
    p.add_argument("--encoder", default="minilm", choices=ENCODERS)
    p.add_argument("--out", required=True, help="output .npz file")
    args = p.parse_args(argv)
    if args.encoder == "minilm":
        # The packaged model is local; make sure nothing even tries the hub (set before any
        # huggingface import reads them). CLIP keeps the user's setting: it needs the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    names, languages = suite_languages(args.suite)
    emb = embed(languages, args.encoder)
    write_embeddings(args.out, names, languages, emb, args.encoder)
    print(f"{args.suite}: n={emb.shape[0]} dim={emb.shape[1]} encoder={args.encoder} "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
