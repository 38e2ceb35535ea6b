"""Kimi K2's control tokens: their texts, their ids in the released vocabulary, and how ids move
when the base vocabulary is smaller (the tiny BPE files that tests build).

The released `tiktoken.model` has 163584 base ranks and 256 special slots after them (163584 ..
163839). A vocabulary with `num_base` base ranks keeps the same layout: the token that K2 puts at
id `k2_id` sits at `num_base + (k2_id - 163584)`, and every slot without a named token holds
`<|reserved_token_N|>` with N the slot's id in that vocabulary.
"""

K2_NUM_BASE_TOKENS = 163584
NUM_SPECIAL_SLOTS = 256

BOS = "[BOS]"
EOS = "[EOS]"
IM_END = "<|im_end|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
TOOL_CALLS_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"
UNK = "[UNK]"
PAD = "[PAD]"

# The singular spelling is not a token of the vocabulary, but models and other stacks write it as
# text, so parsers accept it wherever the plural one is accepted.
TOOL_CALL_SECTION_BEGIN_SINGULAR = "<|tool_call_section_begin|>"
TOOL_CALL_SECTION_END_SINGULAR = "<|tool_call_section_end|>"

K2_SPECIAL_TOKEN_IDS: dict[str, int] = {
    BOS: 163584,
    EOS: 163585,
    IM_END: 163586,
    IM_USER: 163587,
    IM_ASSISTANT: 163588,
    "<|start_header_id|>": 163590,
    "<|end_header_id|>": 163591,
    "[EOT]": 163593,
    IM_SYSTEM: 163594,
    TOOL_CALLS_SECTION_BEGIN: 163595,
    TOOL_CALLS_SECTION_END: 163596,
    TOOL_CALL_BEGIN: 163597,
    TOOL_CALL_ARGUMENT_BEGIN: 163598,
    TOOL_CALL_END: 163599,
    IM_MIDDLE: 163601,
    "<|media_begin|>": 163602,
    "<|media_content|>": 163603,
    "<|media_end|>": 163604,
    "<|media_pad|>": 163605,
    THINK_BEGIN: 163606,
    THINK_END: 163607,
    UNK: 163838,
    PAD: 163839,
}

# Reasoning and tool-call markers carry structure the output parsers need, so decoding with
# `skip_special_tokens=True` keeps them; every other control token is dropped.
KEPT_WHEN_SKIPPING_SPECIALS = frozenset({
    THINK_BEGIN, THINK_END, TOOL_CALLS_SECTION_BEGIN, TOOL_CALLS_SECTION_END, TOOL_CALL_BEGIN,
    TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END,
})


def special_tokens_for(num_base_tokens: int) -> dict[str, int]:
    """All 256 special tokens (named and reserved) for a vocabulary of `num_base_tokens` ranks."""
    name_by_slot = {k2_id - K2_NUM_BASE_TOKENS: name for name, k2_id in K2_SPECIAL_TOKEN_IDS.items()}
    tokens = {}
    for slot in range(NUM_SPECIAL_SLOTS):
        token_id = num_base_tokens + slot
        tokens[name_by_slot.get(slot, f"<|reserved_token_{token_id}|>")] = token_id
    return tokens
