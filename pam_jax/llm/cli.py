"""`pam-jax generate`: text generation with a converted Qwen2 model directory."""

from __future__ import annotations

import argparse

from pam_jax.cliutil import (
    CLIError,
    add_dtype_argument,
    add_sampling_arguments,
    resolve_dtype,
    sampling_from_args,
    status,
    step_progress,
)


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
    add_sampling_arguments(p, max_new_tokens=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stop-id",
        type=int,
        action="append",
        default=None,
        help="extra stop token id (repeatable); the tokenizer's eos ids always stop",
    )
    add_dtype_argument(p, what="the model (weights too)")
    p.add_argument(
        "--print-ids",
        action="store_true",
        help="print the generated ids, one comma-separated line per sequence",
    )
    return p


def _parse_ids(s: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise CLIError(f"--input-ids must be comma-separated integers, got {s!r}") from None
    if not ids:
        raise CLIError("--input-ids is empty")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise CLIError(
            f"--input-ids: token id(s) {bad[:5]} outside the vocabulary (0 .. {vocab_size - 1})"
        )
    return ids


def run(args) -> int:
    import time

    import numpy as np

    from pam_jax.llm.io import load_qwen2, read_config
    from pam_jax.llm.sampler import generate

    cfg = read_config(args.model)
    # the inputs are checked before the weights are read
    seqs = (
        None if args.input_ids is None else [_parse_ids(s, cfg.vocab_size) for s in args.input_ids]
    )
    bad_stop = [i for i in (args.stop_id or []) if not 0 <= i < cfg.vocab_size]
    if bad_stop:
        raise CLIError(
            f"--stop-id {bad_stop[0]} is outside the vocabulary (0 .. {cfg.vocab_size - 1})"
        )
    status(f"loading {args.model}")
    model, cfg, tok = load_qwen2(args.model, resolve_dtype(args.dtype))
    if args.prompt is not None:
        if tok is None:
            raise CLIError(f"{args.model} has no tokenizer; use --input-ids")
        seqs = []
        for text in args.prompt:
            if args.chat:
                msgs = [{"role": "system", "content": args.system}] if args.system else []
                msgs.append({"role": "user", "content": text})
                text = tok.apply_chat_template(msgs, add_generation_prompt=True)
            seqs.append(tok.encode(text))
    if any(len(s) == 0 for s in seqs):
        raise CLIError("a prompt tokenizes to no tokens")
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
    sampling = sampling_from_args(args, tok)
    # one jitted while_loop decodes every token: the tokens / s come at the end
    status(f"generating up to {args.max_new_tokens} tokens for {len(seqs)} sequence(s)")
    t0 = time.perf_counter()
    with step_progress(args.max_new_tokens, desc="decoding") as on_step:
        out = generate(
            model,
            input_ids=ids,
            prompt_lengths=lengths,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            stop_ids=stops,
            pad_id=pad,
            rng=args.seed,
            on_step=on_step,
        )
    n_new = int(np.asarray(out.lengths).sum())
    dt = time.perf_counter() - t0
    status(f"{n_new} tokens in {dt:.1f} s ({n_new / max(dt, 1e-9):.1f} tokens/s, with compilation)")
    for row, n in zip(out.tokens, out.lengths):
        gen = [int(x) for x in row[: int(n)]]
        if args.print_ids or tok is None:
            print(",".join(map(str, gen)))
        else:
            print(tok.decode(gen))
    return 0
