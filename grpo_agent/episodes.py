"""Multi-turn tool-use episodes: a task run K times through the policy with tools, the K episodes one GRPO group.

An episode is one Completion whose token ids run from the end of the prompt through every turn: the tokens the
policy sampled (mask 1, with their sampled log-probs) and the tokens fed back to it between its turns, the end of
its turn, a tool's result and the next turn's header (mask 0, log-prob 0). The updater trains on exactly those ids
with the mask; nothing is re-tokenised (verl and Agent Lightning both found that re-tokenising a chat between
sampling and training breaks policy-gradient training).

The action format suits small models: each of the policy's turns opens with one of two words, chosen by the
model's own probabilities over just those two (their log-probs are the full softmax's, as top-p's are):
"Search" (the rest of the line is the query, sent to the search tool) or "Answer" (the rest of the turn is the
final answer). The last allowed turn is made to answer: its opening word is fed (mask 0), not sampled. While
collecting, `explore` episodes of each group can be made to search on their first turn the same way (the opening
word fed, the query sampled): a policy that almost never searches otherwise never sees what a search is worth
against the answers of its own group. A search's result comes back as the facts block of the agent's own prompt
with the question restated after it, so the answer that follows reads what a single answer reads.

    runner = EpisodeRunner(policy, SearchTool(index))
    groups, retrieved = runner.run(["Why are snow leopards endangered?"], k=4, seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import ContextLengthError
from .prompts import facts_block
from .records import Completion, Group, Passage

SEARCH, ANSWER = "Search", "Answer"
# The bundled model's first turn searches with probability 0.20 under this prompt, 0.07-0.13 when the agent's own
# system prompt comes with it: too rarely for GRPO to learn searching from (tools/bench_episodes.py)
EPISODE_SYSTEM = ("Answer the user's question about the notes. You may search the notes first. Reply with "
                  "'Search:' and a short query to look something up, or with 'Answer:' and your answer.")
_MARK = "\u2063TURN\u2063"  # stands for a turn's content when the chat template renders what follows it


class SearchTool:
    """search(query): the top_k passages of a fact index for a query, as the text the policy reads back: the facts
    block the agent's prompt holds (prompts.facts_block), so an answer after a search reads what a single answer
    reads."""

    name = "search"

    def __init__(self, index, top_k: int = 3):
        self.index, self.top_k = index, top_k

    def max_result_tokens(self, tokenizer) -> int:
        """The most tokens one result can take: the top_k longest passages, their markup and the turn's."""
        if not hasattr(self, "_longest"):
            lengths = sorted((len(tokenizer.encode(p.text, add_special_tokens=False)) for p in self.index.passages()),
                             reverse=True)
            self._longest = sum(lengths[: self.top_k]) + 8 * self.top_k + 48
        return self._longest

    def __call__(self, queries: Sequence[str]) -> list[tuple[str, list[Passage]]]:
        hits = self.index.search_batch(list(queries), k=self.top_k)
        return [(facts_block([h.passage for h in found]) if found else "No facts found for that query.",
                 [h.passage for h in found]) for found in hits]


@dataclass
class Trace:
    """An episode's token ids after its first prompt, as the updater trains on them: those the policy sampled
    (mask 1, with their sampled log-probs) and those fed to it between its turns (mask 0, log-prob 0)."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)

    def add(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        """Token ids the policy sampled (with their log-probs) or, logprobs None, ids fed to it."""
        self.tokens += list(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        self.mask += [1 if logprobs is not None else 0] * len(ids)

    def completion(self, text: str, finish_reason: str, turns: list[dict]) -> Completion:
        """The episode as the store and the updater take it: its final answer's text, every token id after the
        first prompt with its log-prob and mask, and its turns."""
        return Completion(text=text, token_ids=list(self.tokens), logprobs=list(self.logprobs),
                          finish_reason=finish_reason, mask=list(self.mask), turns=list(turns))


@dataclass(kw_only=True, eq=False)
class _Episode(Trace):
    """One episode as it runs."""

    question: str
    chat: list[dict]  # the chat so far as text (turn contents decoded), for the template and for people
    prompt: list[int]
    turns: list[dict] = field(default_factory=list)
    passages: list[Passage] = field(default_factory=list)
    answer: str = ""
    finish_reason: str = "length"
    done: bool = False



class EpisodeRunner:
    """Runs K episodes per task in lockstep batches (every active episode's turn in one sampling call)."""

    def __init__(self, policy, tool: SearchTool, max_turns: int = 3, max_new_tokens: int = 48,
                 query_tokens: int = 24, temperature: float = 1.0, top_p: float = 1.0,
                 system: str = EPISODE_SYSTEM):
        if max_turns < 1:
            raise ValueError(f"max_turns = {max_turns}: an episode needs at least one turn (its answer)")
        self.policy, self.tool, self.max_turns = policy, tool, max_turns
        self.max_new_tokens, self.query_tokens = max_new_tokens, query_tokens
        self.temperature, self.top_p, self.system = temperature, top_p, system
        tok = policy.tokenizer
        self.words = {w: tok.encode(w, add_special_tokens=False)[0] for w in (SEARCH, ANSWER)}
        self.answer_ids = tok.encode(ANSWER, add_special_tokens=False)  # fed whole on the last turn
        self.search_ids = tok.encode(SEARCH, add_special_tokens=False)  # fed whole on an exploring first turn
        if self.words[SEARCH] == self.words[ANSWER]:
            raise ValueError(f"{SEARCH!r} and {ANSWER!r} start with the same token for this tokenizer")
        # a query ends at the end of its line (any token holding a newline) or at the end of the turn
        newline = [i for t, i in tok.get_vocab().items() if "\n" in tok.convert_tokens_to_string([t])]
        self.query_stops = sorted(set(newline) | set(policy.stop_token_ids))

    def budget(self) -> int:
        """Tokens an episode may take past its prompt, at most (every turn a search, then the answer); a search's
        result restates the question, counted apart (check_fits)."""
        per_search = len(self.search_ids) + self.query_tokens + self.tool.max_result_tokens(self.policy.tokenizer)
        return (self.max_turns - 1) * per_search + len(self.answer_ids) + self.max_new_tokens

    def chat(self, question: str) -> list[dict]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": question}]

    def check_fits(self, questions: Sequence[str]) -> None:
        """ContextLengthError for the first question whose episode could run past the model's context."""
        limit = self.policy.context_length
        for i, q in enumerate(questions):
            n = len(self.policy.encode_chat(self.chat(q)))
            need = self.budget() + (self.max_turns - 1) * len(self.policy.tokenizer.encode(
                _restated(q), add_special_tokens=False))
            if limit is not None and n + need > limit:
                raise ContextLengthError(f"an episode for question {i} may take {n} + {need} tokens, past "
                                         f"the model's {limit}; lower episodes.max_turns or max_new_tokens",
                                         index=i, prompt_tokens=n, limit=limit)

    def run(self, questions: Sequence[str], k: int, seed: int | None = None,
            explore: int = 0) -> tuple[list[Group], list[list[list[Passage]]]]:
        """K episodes for each question: one Group each (its completions the episodes), and the passages each
        episode retrieved (per group, per episode). The last `explore` episodes of each group search on their first
        turn (for collecting; 0 when serving or evaluating)."""
        if not 0 <= explore < k:
            raise ValueError(f"explore = {explore}: the episodes made to search must be fewer than k = {k}, so the "
                             "group's others still choose")
        gen = torch.Generator()
        gen.manual_seed(seed) if seed is not None else gen.seed()
        episodes = []
        for q in questions:
            chat = self.chat(q)
            prompt = self.policy.encode_chat(chat)
            episodes += [_Episode(question=q, chat=[dict(m) for m in chat], prompt=list(prompt)) for _ in range(k)]
        for turn in range(self.max_turns):
            active = [e for e in episodes if not e.done]
            if not active:
                break
            forced = {i for i in range(len(active)) if i % k >= k - explore} if turn == 0 else set()  # (all active)
            searchers = self._turn(active, int(torch.randint(2**31 - 1, (1,), generator=gen)),
                                   last=turn == self.max_turns - 1, forced=forced)
            if searchers:
                self._search(searchers)
        groups, retrieved = [], []
        for b, q in enumerate(questions):
            mine = episodes[b * k:(b + 1) * k]
            groups.append(Group(messages=self.chat(q), prompt_token_ids=mine[0].prompt,
                                completions=[e.completion(e.answer, e.finish_reason, e.turns) for e in mine], policy_version=self.policy.version,
                                temperature=self.temperature))
            retrieved.append([e.passages for e in mine])
        return groups, retrieved

    def _turn(self, active: list[_Episode], seed: int, last: bool, forced: set[int] = frozenset()) -> list[_Episode]:
        """One turn of every active episode: the opening word chosen between the two by the model's own
        probabilities (on the last turn "Answer" is fed instead, and "Search" for the `forced` ones, indices into
        `active`), then the rest of the turn; the episodes of each kind in one sampling call. A search turn is kept
        up to the end of its query's line (at most query_tokens); the tokens sampled after it are dropped, never fed
        back. Returns the episodes that searched."""
        s, a = self.words[SEARCH], self.words[ANSWER]
        opening = [self.answer_ids if last else self.search_ids if i in forced else None for i in range(len(active))]
        starts = [len(e.tokens) for e in active]  # where each turn begins: its opening word
        for e, words in zip(active, opening):
            if words is not None:
                e.add(words, None)
        sampled = {}
        for rows, first in (([i for i, w in enumerate(opening) if w is None], [s, a]),
                            ([i for i, w in enumerate(opening) if w is not None], None)):
            if rows:
                groups = self.policy.sample([[{"role": "user", "content": ""}]] * len(rows), k=1,
                                            max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                            top_p=self.top_p, seed=(seed + len(sampled)) % 2**31,  # (apart draws)
                                            prompt_ids=[active[i].prompt + active[i].tokens for i in rows],
                                            first_tokens=first)
                sampled.update(zip(rows, (g.completions[0] for g in groups)))
        tok, searchers = self.policy.tokenizer, []
        stops = set(self.query_stops)
        for i, e in enumerate(active):
            c = sampled[i]
            ids, logprobs, finish = c.token_ids, c.logprobs, c.finish_reason
            searching = not last and (i in forced or ids[0] == s)
            if searching:  # the query: its line, at most query_tokens after the opening word
                q = 0 if i in forced else 1  # where the query begins in the sampled ids
                end = next((j for j, t in enumerate(ids[q : q + self.query_tokens], q) if t in stops),
                           min(len(ids), q + self.query_tokens) - 1)
                ids, logprobs = ids[: end + 1], logprobs[: end + 1]
            e.add(ids, logprobs)
            text = tok.decode(e.tokens[starts[i]:], skip_special_tokens=True).strip()
            word = SEARCH if searching else ANSWER
            body = (text[len(word):] if text.startswith(word) else text).lstrip(" :").strip()
            e.turns.append({"role": "assistant", "content": text, "action": "search" if searching else "answer"})
            if i in forced and not last:
                e.turns[-1]["forced"] = True  # an exploring episode's search: not its choice
            e.chat.append({"role": "assistant", "content": text})
            if searching:
                e.turns[-1]["query"] = body
                searchers.append(e)
            else:
                e.answer, e.finish_reason, e.done = body, finish, True
        return searchers

    def _search(self, batch: list[_Episode]) -> None:
        """Run each episode's query and feed the result back, with the turn markers around it."""
        queries = [e.turns[-1]["query"] for e in batch]
        asked = [i for i, q in enumerate(queries) if q]
        results = dict(zip(asked, self.tool([queries[i] for i in asked]))) if asked else {}
        for i, e in enumerate(batch):
            if i in results:
                text, passages = results[i]
                e.passages += [p for p in passages if p.id not in {x.id for x in e.passages}]
                e.turns.append({"role": "tool", "name": self.tool.name, "content": text,
                                "passage_ids": [p.id for p in passages]})
            else:
                text = "error: the query is empty; write the words to search for after 'Search:'"
                e.turns.append({"role": "tool", "name": self.tool.name, "content": text, "error": True})
            result = {"role": "user", "content": f"{text}\n\n{_restated(e.question)}"}
            e.add(self._fed_back(e, result), None)
            e.chat.append(result)

    def _fed_back(self, e: _Episode, result: dict) -> list[int]:
        return fed_back(self.policy.tokenizer, e.chat[:-1], [result], e.tokens[-1], self.policy.stop_token_ids)


def _restated(question: str) -> str:
    """The question, after each search result: what the agent's prompt holds after its facts (answer_messages)."""
    return f"Question: {question}"


def fed_back(tokenizer, chat: Sequence[dict], new: Sequence[dict], last_token: int, stop_ids: Sequence[int]) -> list[int]:
    """The token ids between the end of the policy's turn (after `chat`, its last sampled token `last_token`) and
    its next turn: the rest of its turn's closing markup, the `new` turns (a tool's result) and the next assistant
    header, as the chat template renders them. The policy's own turn is not rendered, so never re-tokenised."""
    rendered = tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": _MARK}, *new],
                                             add_generation_prompt=True, tokenize=False)
    tail = rendered[rendered.rindex(_MARK) + len(_MARK):]
    if last_token in stop_ids:  # the turn's end-of-turn token was sampled: do not feed it twice
        said = tokenizer.decode([last_token])
        tail = tail[len(said):] if tail.startswith(said) else tail
    return tokenizer.encode(tail, add_special_tokens=False)


def tokens_covering(tokenizer, ids: Sequence[int], text: str) -> list[int]:
    """The shortest prefix of `ids` whose decoded text holds `text` (an answer cut at a stop sequence): what a
    conversation continues from, the tokens sampled after the cut never fed back."""
    want = len(text.strip())
    for n in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:n], skip_special_tokens=True).strip()) >= want:
            return list(ids[:n])
    return list(ids)

