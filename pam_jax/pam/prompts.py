"""PAM's task prompts and the Qwen2 chat template around the `<image>` placeholder.

Prompts are verbatim from the release notebooks (`notebooks/*_infer_example.ipynb`). The
conversation is LLaVA's `conv_templates["qwen_2"]` (ChatML, system "You are a helpful
assistant."):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<image>\\n{TASK}<|im_end|>\\n<|im_start|>assistant\\n   (one string)

and, like `mm_utils.tokenizer_image_token`, the text before and after `<image>` is tokenized
separately; the visual embeddings are spliced in between (`assembly.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
SYSTEM = "You are a helpful assistant."

# task -> {language: prompt}. "zh" is the release's "ch".
TASKS: dict[str, dict[str, str]] = {
    "recognize": {
        "en": "Classify this subject and provide its label.",
        "zh": "对该目标对象进行分类并提供标签",
    },
    "explain": {
        "en": "Classify this subject and provide the label and its definition.",
        "zh": "对该目标对象进行分类并提供标签和名词功能解释",
    },
    "brief_caption": {
        "en": "Provide a concise caption for this subject.",
        "zh": "对该目标对象提供一个概括的描述",
    },
    "detailed_caption": {
        "en": "Provide a comprehensive and detailed description for this subject.",
        "zh": "对该目标对象提供一个全面且详细的描述",
    },
    # video captioning; streaming fills {history} with the previous clip's caption
    "video_caption": {
        "en": "Provide a caption for this subject in this video.\nPrevious caption: {history}",
        "zh": "对该视频中的目标对象提供一个描述。\n历史描述：{history}",
    },
}
# the release's own mode names (notebooks), for users who know them
RELEASE_MODES = {
    "recognize": "recognize",
    "explain": "explain",
    "brief_cap": "brief_caption",
    "detail_cap": "detailed_caption",
    "video_cap": "video_caption",
}
NO_HISTORY = {"en": "None", "zh": "无"}
IMAGE_TASKS = ("recognize", "explain", "brief_caption", "detailed_caption")
VIDEO_TASKS = ("video_caption", "streaming_caption")
LANGS = ("en", "zh")


def normalize_lang(lang: str) -> str:
    """ "en" or "zh" ("ch", the release's name, and "cn" mean "zh"); ValueError otherwise."""
    lang = {"ch": "zh", "cn": "zh"}.get(lang, lang)
    if lang not in LANGS:
        raise ValueError(f"unknown language {lang!r}; expected 'en' or 'zh'")
    return lang


# `pam-jax predict --task` names -> task names
CLI_TASKS = {
    "caption": "brief_caption",
    "brief-caption": "brief_caption",
    "detailed-caption": "detailed_caption",
    "video-caption": "video_caption",
}
# the commands' --task choices for images (predict, perceive) and --lang choices
CLI_IMAGE_TASKS = ("recognize", "explain", "caption", "detailed-caption")
CLI_LANGS = ("en", "zh", "ch")


def task_prompt(task: str, lang: str = "en", history: str | None = None) -> str:
    """The user instruction for a task, e.g. `task_prompt("recognize")`.

    Tasks: recognize, explain, brief_caption, detailed_caption (images), video_caption and
    streaming_caption (videos; `history` = the previous clip's caption, None for the first clip,
    which the release writes as "None" / "无"). Release mode names ("brief_cap_en", ...) and the
    CLI's names ("caption", "detailed-caption") work too.
    """
    task = CLI_TASKS.get(task, task)
    if task not in TASKS and task != "streaming_caption":
        base, _, suffix = task.rpartition("_")
        if base in RELEASE_MODES and suffix in ("en", "ch"):
            task, lang = RELEASE_MODES[base], suffix
        else:
            raise ValueError(
                f"unknown task {task!r}; expected one of {[*TASKS, 'streaming_caption']}"
            )
    lang = normalize_lang(lang)
    if task == "streaming_caption":
        task = "video_caption"
    text = TASKS[task][lang]
    if "{history}" in text:
        text = text.replace("{history}", NO_HISTORY[lang] if history is None else history)
    elif history is not None:
        raise ValueError(f"task {task!r} takes no history")
    return text


def chat_prompt(instruction: str, system: str = SYSTEM) -> str:
    """The full ChatML string (with the `<image>` placeholder) the release feeds its tokenizer."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE_PLACEHOLDER}\n{instruction}<|im_end|>\n"
        f"<|im_start|>assistant\n"
    )


def split_prompt(instruction: str, system: str = SYSTEM) -> tuple[str, str]:
    """(text before `<image>`, text after it), as `tokenizer_image_token` splits the prompt."""
    before, after = chat_prompt(instruction, system).split(IMAGE_PLACEHOLDER)
    return before, after


def _encode_fn(tokenizer: Any) -> Callable[[str], list[int]]:
    """Accept a callable, an object with `.encode` returning ids or an `Encoding` (tokenizers)."""
    enc = tokenizer.encode if hasattr(tokenizer, "encode") else tokenizer

    def f(text: str) -> list[int]:
        out = enc(text)
        ids = getattr(out, "ids", out)
        return [int(i) for i in ids]

    return f


def prompt_ids(
    tokenizer: Any,
    task: str,
    lang: str = "en",
    history: str | None = None,
    system: str = SYSTEM,
) -> tuple[list[int], list[int]]:
    """Token ids before and after the `<image>` placeholder for one task.

    The chat template's special tokens (`<|im_start|>`, `<|im_end|>`) must be special tokens of
    the tokenizer (they are in Qwen2's); Qwen2 adds no BOS, so nothing is stripped.
    """
    before, after = split_prompt(task_prompt(task, lang, history), system)
    enc = _encode_fn(tokenizer)
    return enc(before), enc(after)


def input_ids_with_placeholder(
    ids_before: Sequence[int], ids_after: Sequence[int], image_token_index: int = -200
) -> list[int]:
    """The release's `input_ids`: text ids with one `IMAGE_TOKEN_INDEX` (-200) between them."""
    return [*ids_before, image_token_index, *ids_after]
