"""The HF tokenizer of a model directory, without transformers.

Reads `tokenizer.json` (the `tokenizers` library), `tokenizer_config.json` (special tokens, chat
template), `chat_template.jinja` (transformers >= 4.43 writes the template there) and
`generation_config.json` (eos ids, sampling defaults). The chat template is rendered with
jinja2 the way transformers does (sandboxed, trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pam_jax.checkpoint import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# Used only when a directory carries no template (Qwen2.5's ChatML, no default system prompt).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _token_str(t: Any) -> str | None:
    if isinstance(t, dict):
        return t.get("content")
    return t


class Tokenizer:
    def __init__(
        self,
        tokenizer,
        config: dict | None = None,
        generation_config: dict | None = None,
        chat_template: str | None = None,
    ):
        self.tok = tokenizer
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        self.chat_template = chat_template or self.config.get("chat_template")

    @classmethod
    def from_dir(cls, d: str | os.PathLike) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(d)
        if not (d / "tokenizer.json").is_file():
            raise CheckpointError(f"{d} has no tokenizer.json")
        tok = HFTokenizer.from_file(str(d / "tokenizer.json"))

        def read(name):
            p = d / name
            return json.loads(p.read_text()) if p.is_file() else None

        config = read("tokenizer_config.json") or {}
        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        elif (ct := read("chat_template.json")) is not None:
            template = ct.get("chat_template")
        if isinstance(config.get("chat_template"), list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in config["chat_template"]}
            config["chat_template"] = named.get("default")
        return cls(tok, config, read("generation_config.json"), template)

    # ---- ids -------------------------------------------------------------------------------
    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(_token_str(self.config.get("eos_token")))

    @property
    def pad_token_id(self) -> int | None:
        pid = self.token_id(_token_str(self.config.get("pad_token")))
        return pid if pid is not None else self.eos_token_id

    @property
    def stop_ids(self) -> list[int]:
        """The tokenizer's eos plus every eos id of generation_config.json (Qwen2.5-Instruct
        stops on both <|im_end|> and <|endoftext|>)."""
        ids: list[int] = []
        ge = self.generation_config.get("eos_token_id")
        for x in [self.eos_token_id, *(ge if isinstance(ge, list) else [ge])]:
            if x is not None and x not in ids:
                ids.append(int(x))
        return ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    # ---- chat ------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs,
    ) -> str | list[int]:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x,
                ensure_ascii=ensure_ascii,
                indent=indent,
                separators=separators,
                sort_keys=sort_keys,
            )

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        template = env.from_string(self.chat_template or CHATML)
        special = {
            k: _token_str(self.config.get(k))
            for k in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        text = template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in special.items() if v is not None},
            **kwargs,
        )
        return self.encode(text) if tokenize else text
