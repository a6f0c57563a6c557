"""The tokenizer, from the GGUF file: llama.cpp's own (llama-cpp-python, `vocab_only=True`: no weights
are loaded), so leank sees exactly the tokens llama.cpp would. The chat template is `template`."""
from __future__ import annotations

import codecs
import ctypes
import os

from leank.errors import LeankError


def _llama_cpp():
    try:
        import llama_cpp  # heavy (a native library), loaded when a tokenizer is first made
    except ImportError as e:  # pragma: no cover - a dependency
        raise LeankError("llama-cpp-python is not installed: pip install llama-cpp-python") from e
    return llama_cpp


class Tokenizer:
    """llama.cpp's tokenizer for a GGUF file (vocab only)."""

    def __init__(self, path: str | os.PathLike[str]):
        lc = _llama_cpp()
        self._lc = lc
        params = lc.llama_model_default_params()
        params.vocab_only = True
        # llama.cpp logs to stderr through its own callback; keep it quiet unless debugging
        if not os.environ.get("LEANK_DEBUG"):
            _silence_llama_logs(lc)
        self._model = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise LeankError(f"{path}: llama.cpp could not read this file's vocabulary")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.bos_id = lc.llama_vocab_bos(self._vocab)
        self.eos_id = lc.llama_vocab_eos(self._vocab)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self.add_eos = bool(lc.llama_vocab_get_add_eos(self._vocab))
        # end-of-generation tokens as llama.cpp decides them (eos, eot, <|im_end|>, ...)
        self.eog_ids = frozenset(t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self._vocab, t))
        self._pieces: dict[int, bytes] = {}

    def __del__(self):
        model = getattr(self, "_model", None)
        if model:
            self._lc.llama_model_free(model)
            self._model = None

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS/EOS as the file asks (llama.cpp's rule)."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (self._lc.llama_token * n_max)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (self._lc.llama_token * n_max)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
            if n < 0:
                raise LeankError("llama.cpp could not tokenize the text")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (control tokens are empty unless `special`)."""
        key = token if not special else -1 - token
        cached = self._pieces.get(key)
        if cached is not None:
            return cached
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = self._lc.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                break
            size = -n
        out = buf.raw[:n]
        self._pieces[key] = out
        return out

    def detokenize(self, ids, special: bool = False) -> str:
        return b"".join(self.piece(int(t), special) for t in ids).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens into text as they come, holding back incomplete UTF-8 sequences."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tok.piece(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def _silence_llama_logs(lc) -> None:
    if getattr(_silence_llama_logs, "done", False):
        return

    @lc.llama_log_callback
    def _quiet(level, text, user_data):  # noqa: ARG001
        return None

    lc.llama_log_set(_quiet, ctypes.c_void_p(0))
    _silence_llama_logs.done = True
    _silence_llama_logs.callback = _quiet  # keep a reference: ctypes callbacks must outlive their use
