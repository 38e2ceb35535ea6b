"""Tool-call ids in K2's form, `functions.NAME:IDX` (IDX counts calls across the conversation).

The template renders ids of this form as given and the model echoes them; NAME is the part
between the first `.` and the last `:`. Generated ids are read as vLLM and SGLang read them:
`NAME:IDX` without the `functions.` prefix names NAME too, and an id with no `:IDX` (or with
whitespace) names no function, so its call is dropped rather than given a made-up name.
"""

import re

# The id the template writes and a history should hold.
K2_TOOL_CALL_ID = re.compile(r"functions\.(?P<name>[^:\s]+):(?P<index>\d+)")
# The ids a generated call may carry.
# (`functions.:0` has an empty NAME, not the name `functions.`.)
GENERATED_TOOL_CALL_ID = re.compile(
    r"(?!functions\.:)(?:functions\.)?(?P<name>[^:\s]+):(?P<index>\d+)")


def is_k2_tool_call_id(call_id: str) -> bool:
    return K2_TOOL_CALL_ID.fullmatch(call_id) is not None


def tool_name_from_id(call_id: str) -> str | None:
    """`functions.NAME:IDX` (or `NAME:IDX`) -> NAME; None for an id that names no function."""
    match = GENERATED_TOOL_CALL_ID.fullmatch(call_id)
    return match["name"] if match else None
