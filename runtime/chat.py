"""A multi-turn conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the chat template. The cache holds the text of the
conversation so far (`held_text`: the rendered prompt plus the reply tokens fed back); when the new
rendering extends it, only the new text is tokenized and fed. Otherwise (an interrupted reply, a
template that rewrites history) the cache is rebuilt from the full conversation.

`save(path)` writes the conversation (its cache, the token ids it holds, the messages) to one session
file (`leank.runtime.cache.session`); `load(path)` resumes it, refusing a file of another model or policy.
"""
from __future__ import annotations

from typing import Iterator

from leank.errors import LeankError
from leank.runtime.cache.session import load_session, save_session
from leank.runtime.generate import Step


class ChatSession:
    def __init__(self, model, system: str | None = None, policy=None, context_length: int | None = None):
        self.model, self.system, self.policy = model, system, policy
        self.context_length = context_length or model.args.context_length  # at most the model's
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = self.model.new_cache(policy=self.policy)
        self.held_text = ""
        self.tokens: list[int] = []  # the token ids the cache holds, in order
        self.last_stats = None
        self.rebuilds = 0

    def save(self, path, *, force: bool = True, what: str = "") -> int:
        """Write the conversation to a session file, atomically; returns its size in bytes (`force=False`
        refuses an existing file; `what` names the option in messages)."""
        extra = {"chat": {"messages": self.messages, "held_text": self.held_text, "system": self.system}}
        return save_session(path, self.model, self.cache, self.tokens, extra, force=force, what=what)

    def load(self, path) -> None:
        """Resume the conversation saved in `path` (under this session's policy); nothing changes if it is refused."""
        saved = load_session(path, self.model, self._policy())
        chat = saved.extra.get("chat")
        ok = (isinstance(chat, dict) and isinstance(chat.get("held_text"), str)
              and isinstance(chat.get("messages"), list)
              and all(isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str)
                      for x in chat["messages"])
              and (chat.get("system") is None or isinstance(chat.get("system"), str)))
        if not ok:
            raise LeankError(f"{path}: a session file without a chat conversation")
        self.cache, self.tokens = saved.cache, saved.tokens
        self.messages = [{"role": x["role"], "content": x["content"]} for x in chat["messages"]]
        self.held_text, self.system = chat["held_text"], chat.get("system")
        self.last_stats = None

    def _policy(self):
        return self.model.policy if self.policy is None else self.policy

    def send(self, text: str, **sampling) -> Iterator[Step]:
        """Add a user turn and stream the assistant's reply (sampling options as `Model.stream`)."""
        m = self.model
        self.messages.append({"role": "user", "content": text})
        try:
            rendered = m.apply_chat_template(self.messages)
        except LeankError:
            self.messages.pop()
            raise
        if self.cache.seq_len and rendered.startswith(self.held_text):
            new = m.tokenize(rendered[len(self.held_text):], add_special=False, parse_special=True)
            held = self.tokens
        else:
            if self.cache.seq_len:
                self.rebuilds += 1
            self.cache = m.new_cache(policy=self.policy)
            new = m.chat_tokens(self.messages)
            held = []
        limit = min(self.context_length, m.args.context_length)
        if self.cache.seq_len + len(new) >= limit:
            self.messages.pop()
            raise LeankError(f"the conversation ({self.cache.seq_len + len(new)} tokens) has reached the "
                             f"context of {limit} tokens; /reset starts a new one")
        start = self.cache.seq_len + len(new)
        sampling["max_tokens"] = min(sampling.get("max_tokens", limit), limit - start)
        reply: list[str] = []
        generated: list[int] = []
        settled = True  # False while a forward pass may be half done
        try:
            settled = False
            for step in m.stream(new, cache=self.cache, **sampling):
                settled = True
                if step.token is not None:
                    generated.append(step.token)
                reply.append(step.text)
                if step.stats is not None:
                    self.last_stats = step.stats
                yield step
                settled = False
            settled = True
        finally:
            fed = self.cache.seq_len - start  # reply tokens the cache took in
            if settled and 0 <= fed <= len(generated):
                self.held_text = rendered + m.tokenizer.detokenize(generated[:fed])
                self.tokens = held + new + generated[:fed]
            else:  # interrupted inside a forward pass: some layers took the token, others not
                self.cache = m.new_cache(policy=self.policy)
                self.held_text = ""
                self.tokens = []
            self.messages.append({"role": "assistant", "content": "".join(reply)})
