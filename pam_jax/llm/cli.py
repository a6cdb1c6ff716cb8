"""`pam-jax generate`: text generation with a converted Qwen2 model directory."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "generate",
        help="generate text with a Qwen2 model",
        description="Generate with a pam-jax Qwen2 model directory (see `pam-jax convert llm`). "
        "Several --prompt or --input-ids make a batch. Temperature 0 is greedy.",
    )
    p.add_argument("--model", required=True, help="pam-jax model directory (kind qwen2)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument(
        "--input-ids",
        action="append",
        help="comma-separated token ids, e.g. 1,2,3 (repeat for a batch)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message with the tokenizer's chat template",
    )
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="HF-style penalty on tokens already seen (1 = off; Qwen2.5-Instruct's "
        "generation config uses 1.05)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stop-id",
        type=int,
        action="append",
        default=None,
        help="extra stop token id (repeatable); the tokenizer's eos ids always stop",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="compute and weight dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)",
    )
    p.add_argument(
        "--print-ids",
        action="store_true",
        help="print the generated ids, one comma-separated line per sequence",
    )
    return p


def _parse_ids(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise SystemExit(
            f"error: --input-ids must be comma-separated integers, got {s!r}"
        ) from None
    if not ids:
        raise SystemExit("error: --input-ids is empty")
    return ids


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pam_jax.checkpoint import CheckpointError
    from pam_jax.llm.io import load_qwen2
    from pam_jax.llm.sampler import SamplingParams, generate

    if args.dtype == "auto":
        dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    else:
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    try:
        model, cfg, tok = load_qwen2(args.model, dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        if tok is None:
            print(f"error: {args.model} has no tokenizer; use --input-ids", file=sys.stderr)
            return 2
        seqs = []
        for text in args.prompt:
            if args.chat:
                msgs = [{"role": "system", "content": args.system}] if args.system else []
                msgs.append({"role": "user", "content": text})
                text = tok.apply_chat_template(msgs, add_generation_prompt=True)
            seqs.append(tok.encode(text))
    else:
        seqs = [_parse_ids(s) for s in args.input_ids]
    if any(len(s) == 0 for s in seqs):
        print("error: a prompt tokenizes to no tokens", file=sys.stderr)
        return 2
    lengths = np.array([len(s) for s in seqs])
    ids = np.zeros((len(seqs), lengths.max()), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    stops = list(tok.stop_ids) if tok is not None else []
    if cfg.eos_token_id is not None:
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        stops += [e for e in eos if e not in stops]
    stops += [s for s in (args.stop_id or []) if s not in stops]
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty)
        out = generate(
            model,
            input_ids=ids,
            prompt_lengths=lengths,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            stop_ids=stops,
            pad_id=pad,
            rng=args.seed,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for row, n in zip(out.tokens, out.lengths):
        gen = [int(x) for x in row[: int(n)]]
        if args.print_ids:
            print(",".join(map(str, gen)))
        elif tok is not None:
            print(tok.decode(gen))
        else:
            print(",".join(map(str, gen)))
    return 0
