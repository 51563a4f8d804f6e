"""Tool calling for models without native support: the tools are described in a system turn, and a JSON
object naming one of them in the answer is read back as a call. Shared by the LangChain chat model and the
OpenAI-compatible server, so both speak the same protocol to the model."""

from __future__ import annotations

import json
import re
import uuid
from typing import Sequence

TOOL_PROMPT = (
    "You can call these tools:\n{tools}\n\nTo call a tool, reply with only a JSON object: "
    '{{"tool": "<name>", "arguments": {{...}}}}. Otherwise reply with your answer.'
)


def tool_system_turn(tools: Sequence[dict]) -> dict:
    """A system turn describing OpenAI-format tools ({"type": "function", "function": {...}})."""
    listing = "\n".join(f"- {t['function']['name']}: {t['function'].get('description', '')} arguments: "
                        f"{json.dumps(t['function'].get('parameters', {}).get('properties', {}))}" for t in tools)
    return {"role": "system", "content": TOOL_PROMPT.format(tools=listing)}


def parse_tool_call(text: str, tool_names: Sequence[str]) -> dict | None:
    """The first JSON object in `text` of the form {"tool": <a given tool>, "arguments": {...}} as
    {"name", "args", "id"}, else None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj.get("tool") in tool_names:
            args = obj.get("arguments", {})
            return {"name": obj["tool"], "args": args if isinstance(args, dict) else {"input": args},
                    "id": f"call_{uuid.uuid4().hex[:12]}"}
    return None
