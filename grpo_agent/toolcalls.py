"""Tool calling for models without native support: the tools are described in a system turn, and a JSON
object naming one of them in the answer is read back as a call; earlier calls and their results are turns
of the chat as text, and a stop sequence cuts an answer. Shared by the LangChain chat model and the
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


def tool_calls_turn(calls: Sequence[tuple[str | None, dict]]) -> dict:
    """An assistant turn holding its tool calls ((name, arguments) pairs) as the JSON the model is asked to write:
    one object, or a list of them when there are several."""
    objs = [{"tool": name, "arguments": args} for name, args in calls]
    return {"role": "assistant", "content": json.dumps(objs[0] if len(objs) == 1 else objs)}


def tool_result_turn(name: str | None, content: str) -> dict:
    """A "tool" turn holding a tool's result, naming the tool (the agent shows it to the model as a user turn)."""
    return {"role": "tool", "content": f"Result of tool {name}: {content}"}


def as_shown(turns: Sequence[dict]) -> list[dict]:
    """Turns as the agent shows them to the model: a tool's result as a user turn (few chat templates know a tool
    role)."""
    return [{"role": "user", "content": m["content"]} if m.get("role") == "tool" else dict(m) for m in turns]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first occurrence of any (non-empty) stop sequence, and whether it was cut there."""
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def parse_tool_call(text: str, tool_names: Sequence[str]) -> dict | None:
    """The first JSON object in `text` naming one of the given tools, as {"name", "args", "id"}, else None:
    {"tool": ..., "arguments": {...}} (what tool_system_turn asks for) or {"name": ..., "arguments": ...}
    (what models with native tool templates write)."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        name = obj.get("tool", obj.get("name")) if isinstance(obj, dict) else None  # ours, or a native template's
        if name in tool_names:
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):  # OpenAI style: arguments as a JSON string
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = {"input": args}
            return {"name": name, "args": args if isinstance(args, dict) else {"input": args},
                    "id": f"call_{uuid.uuid4().hex[:12]}"}
    return None
