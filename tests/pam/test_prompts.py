"""Task prompts (verbatim from the release notebooks) and the ChatML split around `<image>`."""

import pytest
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import BPE

from pam_jax.pam import prompts

# The release notebooks' task_modes dicts (image_infer_example / video_infer_example /
# video_stream_infer_example), copied verbatim: our table must reproduce every entry.
RELEASE_TASK_MODES = {
    "brief_cap_en": "<image>\nProvide a concise caption for this subject.",
    "brief_cap_ch": "<image>\n对该目标对象提供一个概括的描述",
    "detail_cap_en": "<image>\nProvide a comprehensive and detailed description for this subject.",
    "detail_cap_ch": "<image>\n对该目标对象提供一个全面且详细的描述",
    "recognize_en": "<image>\nClassify this subject and provide its label.",
    "recognize_ch": "<image>\n对该目标对象进行分类并提供标签",
    "explain_en": "<image>\nClassify this subject and provide the label and its definition.",
    "explain_ch": "<image>\n对该目标对象进行分类并提供标签和名词功能解释",
    "video_cap_en": (
        "<image>\nProvide a caption for this subject in this video.\nPrevious caption: None"
    ),
    "video_cap_ch": "<image>\n对该视频中的目标对象提供一个描述。\n历史描述：无",
}


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE with no merges plus the ChatML specials: Qwen2's structure, tiny vocab."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok


def release_tokenizer_image_token(prompt, encode, image_token_index=-200, bos=None):
    """`llava.mm_utils.tokenizer_image_token`, with `encode(text) -> ids` for the tokenizer."""
    chunks = [encode(c) for c in prompt.split("<image>")]

    def insert_separator(xs, sep):
        return [e for sub in zip(xs, [sep] * len(xs)) for e in sub][:-1]

    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == bos:
        offset = 1
        ids.append(chunks[0][0])
    for x in insert_separator(chunks, [image_token_index] * (offset + 1)):
        ids.extend(x[offset:])
    return ids


@pytest.mark.parametrize("mode", sorted(RELEASE_TASK_MODES))
def test_release_prompts_verbatim(mode):
    assert "<image>\n" + prompts.task_prompt(mode) == RELEASE_TASK_MODES[mode]


def test_task_names_and_languages():
    assert prompts.task_prompt("recognize", "zh") == prompts.task_prompt("recognize_ch")
    assert prompts.task_prompt("detailed_caption", "ch") == prompts.task_prompt("detail_cap_ch")
    assert prompts.task_prompt("streaming_caption", history="A dog runs.") == (
        "Provide a caption for this subject in this video.\nPrevious caption: A dog runs."
    )
    assert prompts.task_prompt("streaming_caption", "zh", history="一只狗在跑。").endswith(
        "历史描述：一只狗在跑。"
    )
    assert prompts.task_prompt("video_caption") == prompts.task_prompt("streaming_caption")
    with pytest.raises(ValueError, match="unknown task"):
        prompts.task_prompt("segment")
    with pytest.raises(ValueError, match="language"):
        prompts.task_prompt("recognize", "fr")
    with pytest.raises(ValueError, match="no history"):
        prompts.task_prompt("recognize", history="x")


def test_chat_template_string():
    s = prompts.chat_prompt(prompts.task_prompt("recognize"))
    assert s == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        "Classify this subject and provide its label.<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "task,lang",
    [
        ("recognize", "en"),
        ("detailed_caption", "zh"),
        ("video_caption", "en"),
        ("streaming_caption", "zh"),
    ],
)
def test_prompt_ids_match_release_tokenization(task, lang):
    tok = byte_tokenizer()
    before, after = prompts.prompt_ids(tok, task, lang, history=None)
    enc = lambda t: tok.encode(t).ids  # noqa: E731
    want = release_tokenizer_image_token(prompts.chat_prompt(prompts.task_prompt(task, lang)), enc)
    assert prompts.input_ids_with_placeholder(before, after) == want
    im_start = tok.token_to_id("<|im_start|>")
    assert before[0] == im_start and before.count(im_start) == 2  # system + user turns
    assert after.count(im_start) == 1  # the assistant turn


def test_cli_task_names_are_accepted_by_the_python_api():
    assert prompts.task_prompt("caption") == prompts.task_prompt("brief_caption")
    assert prompts.task_prompt("detailed-caption", "zh") == prompts.task_prompt("detail_cap_ch")
