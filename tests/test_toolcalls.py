"""The one encoding of tool turns and stop sequences the server and the LangChain model share."""

import json

from grpo_agent.toolcalls import cut_at_stop, tool_calls_turn, tool_result_turn


def test_tool_turns_are_the_text_the_model_is_asked_to_write():
    one = tool_calls_turn([("species_status", {"species": "kakapo"})])
    assert one["role"] == "assistant"
    assert json.loads(one["content"]) == {"tool": "species_status", "arguments": {"species": "kakapo"}}
    two = tool_calls_turn([("a", {}), ("b", {"x": 1})])
    assert json.loads(two["content"]) == [{"tool": "a", "arguments": {}}, {"tool": "b", "arguments": {"x": 1}}]
    assert tool_result_turn("lookup", "scales and meat") == {"role": "tool",
                                                             "content": "Result of tool lookup: scales and meat"}


def test_an_answer_is_cut_at_its_first_stop_sequence():
    assert cut_at_stop("Tigers live in India. Q: next", ["Q:", "India"]) == ("Tigers live in ", True)
    assert cut_at_stop("no stop here", ["###", ""]) == ("no stop here", False)  # an empty stop never cuts
    assert cut_at_stop("text", []) == ("text", False)
