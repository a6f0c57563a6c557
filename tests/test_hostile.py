"""Hostile inputs (issue 7): crafted GGUF headers and `leank.*` metadata, vocabularies llama.cpp would crash
on, chat templates reaching for Python internals or for all the memory, malicious pickles. Every one must
end in one `LeankError` line, before llama.cpp (which aborts the process on some of them) sees the file."""
from __future__ import annotations

import math
import os
import pickle
import resource
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import fuzzing as fz  # tests/fuzzing.py (bench/ is not a package)
import pytest
import torch

from leank.errors import LeankError

U8, U16, U32, I32, F32, STR, ARR, U64, BOOL = fz.U8, fz.U16, fz.U32, fz.I32, fz.F32, fz.STR, fz.ARR, fz.U64, fz.BOOL
NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def seeds(make_tiny, tmp_path_factory):
    """A plain tiny llama and the same with leank metadata, taken apart."""
    from leank.convert.convert import convert

    plain = make_tiny(**fz.SMALL)
    converted = tmp_path_factory.mktemp("hostile") / "converted.gguf"
    convert(plain, converted, "freq:0.5", align=8, k_bits=4, v_bits=2, group_size=16, sink_tokens=4, recent_tokens=32)
    return {"plain": fz.split_gguf(plain.read_bytes()), "converted": fz.split_gguf(converted.read_bytes())}


def craft(parts, path: Path, values=(), drop=(), tensors=None, counts=(None, None)) -> Path:
    """`parts` with metadata `values` ({key: (type, value, sub)}) set, keys `drop`ped, tensors edited."""
    p = fz.GGUFParts(parts.version, [r for r in parts.records if r[0] not in drop],
                     [dict(t) for t in parts.tensors], parts.data, parts.alignment, parts.arch)
    for key, (vtype, value, sub) in dict(values).items():
        key = key.format(a=p.arch)
        fz._set(p, key, fz.enc_record(key.encode(), vtype, value, sub))
    if tensors is not None:
        tensors(p)
    path.write_bytes(p.build(*counts))
    return path


def open_everything(path):
    """What `leank info`, `convert` and `load` read before any weight: the header, args, embedded policy."""
    from leank.runtime.arch.args import read_model_args
    from leank.runtime.gguf.reader import GGUFFile
    from leank.runtime.gguf.schema import policy_from_file

    f = GGUFFile(path)
    return policy_from_file(f, read_model_args(f))


def tokens_of(parts) -> list[bytes]:
    return fz._string_array(parts, "tokenizer.ggml.tokens")


def _second_offset_zero(p):
    p.tensors[1]["offset"] = 0


def _rename(i, name):
    def edit(p):
        p.tensors[i]["name"] = name
    return edit


def _dims(p):
    p.tensors[0]["dims"] = [2**41, 1]


HEADERS = {  # id: (metadata values, tensor edit, header counts, expected fragment); found by review and fuzzing
    "block_count NaN": ({"{a}.block_count": (F32, NAN, None)}, None, (None, None), "not an integer"),
    "width infinite": ({"{a}.embedding_length": (F32, INF, None)}, None, (None, None), "not an integer"),
    "context 0": ({"{a}.context_length": (U32, 0, None)}, None, (None, None), "context_length' = 0 must be within"),
    "no heads": ({"{a}.attention.head_count": (U32, 0, None)}, None, (None, None), "must be at least 1"),
    "2^40 heads": ({"{a}.attention.head_count": (U64, 2**40, None), "{a}.attention.head_count_kv": (U64, 2**40, None)},
                   None, (None, None), "has shape"),
    "a million layers": ({"{a}.block_count": (U32, 10**6, None)}, None, (None, None), "layers claimed"),
    "rope base -1": ({"{a}.rope.freq_base": (F32, -1.0, None)}, None, (None, None), "out of range"),
    "rope base NaN": ({"{a}.rope.freq_base": (F32, NAN, None)}, None, (None, None), "out of range"),
    "norm eps NaN": ({"{a}.attention.layer_norm_rms_epsilon": (F32, NAN, None)}, None, (None, None), "out of range"),
    "rope factor -2": ({"{a}.rope.scaling.factor": (F32, -2.0, None)}, None, (None, None), "out of range"),
    "yarn without original context": ({"{a}.rope.scaling.type": (STR, b"yarn", None), "{a}.rope.scaling.factor": (F32, 4.0, None),
                                       "{a}.rope.scaling.original_context_length": (U32, 0, None)}, None, (None, None),
                                      "must be within"),
    "yarn beta 0": ({"{a}.rope.scaling.type": (STR, b"yarn", None), "{a}.rope.scaling.yarn_beta_fast": (F32, 0.0, None)},
                    None, (None, None), "out of range"),
    "per-layer array of a million": ({"{a}.attention.head_count": (ARR, [2] * 10**6, U8)}, None, (None, None),
                                     "holds 1000000 items"),
    "architecture as an array": ({"general.architecture": (ARR, [b"llama"], STR)}, None, (None, None), "is not a string"),
    "alignment as int32": ({"general.alignment": (I32, 32, None)}, None, (None, None), "not a uint32"),
    "split file": ({"split.count": (U16, 2, None)}, None, (None, None), "split GGUF"),
    "mixture of experts": ({"{a}.expert_count": (U32, 8, None), "{a}.expert_used_count": (U32, 2, None)}, None,
                           (None, None), "mixture-of-experts"),
    "overlapping tensors": ({}, _second_offset_zero, (None, None), "tensors must follow one another"),
    "64-byte tensor name": ({}, _rename(0, b"x" * 64), (None, None), "a name of 64 bytes"),
    "tensor name not UTF-8": ({}, _rename(0, b"\xff\xfe"), (None, None), "not UTF-8"),
    "duplicate tensor": ({}, _rename(1, b"token_embd.weight"), (None, None), "duplicate tensor"),
    "2^41 elements": ({}, _dims, (None, None), "dimension"),
    "2^40 metadata keys": ({}, None, (2**40, None), "truncated"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_crafted_header_is_one_line_error(seeds, tmp_path, case):
    values, tensors, counts, fragment = HEADERS[case]
    path = craft(seeds["plain"], tmp_path / "crafted.gguf", values, tensors=tensors, counts=counts)
    with pytest.raises(LeankError, match=fragment) as info:
        open_everything(path)
    assert "\n" not in str(info.value)


def _vocab_cases(parts):
    tokens = tokens_of(parts)
    n = len(tokens)
    dup = tokens[:-1] + [tokens[0]]
    return {  # llama.cpp 0.3.36 aborts the process (SIGABRT) on the first five; the rest crash older builds or us
        "duplicate tokens": ({"tokenizer.ggml.tokens": (ARR, dup, STR)}, (), "duplicate tokens"),
        "tokens equal up to a NUL": ({"tokenizer.ggml.tokens": (ARR, tokens[:-2] + [b"zz\0a", b"zz\0b"], STR)}, (),
                                     "duplicate tokens"),
        "an empty token named like llama.cpp names it": ({"tokenizer.ggml.tokens": (ARR, [b""] + tokens[1:-1] + [b"[EMPTY_0]"], STR)},
                                                         (), "duplicate tokens"),
        "SPM vocabulary without byte tokens": ({"tokenizer.ggml.model": (STR, b"llama", None)}, (), "no token for byte"),
        "BOS asked for, none named": ({"tokenizer.ggml.pre": (STR, b"glm4", None), "tokenizer.ggml.add_bos_token": (BOOL, True, None)},
                                      ("tokenizer.ggml.bos_token_id",), "names no token"),
        "no_vocab tokenizer": ({"tokenizer.ggml.model": (STR, b"no_vocab", None)}, (), "'no_vocab' is not supported"),
        "token types too short": ({"tokenizer.ggml.token_type": (ARR, [1] * 5, I32)}, (), "array of"),
        "token types as bytes": ({"tokenizer.ggml.token_type": (ARR, [1] * n, U8)}, (), "array of"),
        "scores as strings": ({"tokenizer.ggml.scores": (ARR, [b"x"] * n, STR)}, (), "array of"),
        "merges as numbers": ({"tokenizer.ggml.merges": (ARR, [1, 2], I32)}, (), "merges"),
        "tokens as numbers": ({"tokenizer.ggml.tokens": (ARR, list(range(n)), I32)}, (), "not a list of strings"),
        "fewer tokens than embedding rows": ({"tokenizer.ggml.tokens": (ARR, tokens[:-1], STR)}, (), "embedding"),
    }


@pytest.mark.parametrize("case", ["duplicate tokens", "tokens equal up to a NUL", "an empty token named like llama.cpp names it",
                                  "SPM vocabulary without byte tokens", "BOS asked for, none named", "no_vocab tokenizer",
                                  "token types too short", "token types as bytes", "scores as strings", "merges as numbers",
                                  "tokens as numbers", "fewer tokens than embedding rows"])
def test_vocabulary_llama_cpp_cannot_take_is_refused_first(seeds, tmp_path, case):
    values, drop, fragment = _vocab_cases(seeds["plain"])[case]
    path = craft(seeds["plain"], tmp_path / "vocab.gguf", values, drop)
    with pytest.raises(LeankError, match=fragment):
        open_everything(path)


def test_cli_refuses_a_vocabulary_that_would_abort_the_process(seeds, tmp_path):
    """Through the real command: exit 1 and one line, where llama.cpp alone dies of SIGABRT."""
    bad = craft(seeds["plain"], tmp_path / "dup.gguf", _vocab_cases(seeds["plain"])["duplicate tokens"][0])
    spm = craft(seeds["plain"], tmp_path / "spm.gguf", {"tokenizer.ggml.model": (STR, b"llama", None)})
    env = dict(os.environ, COLUMNS="200", GGML_NO_BACKTRACE="1")
    for path, fragment in ((bad, "duplicate tokens"), (spm, "no token for byte")):
        r = subprocess.run([sys.executable, "-m", "leank.cli", "generate", str(path), "-p", "hello", "-n", "2"],
                           capture_output=True, text=True, timeout=300, env=env)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 1 and len(lines) == 1 and fragment in lines[0], (r.returncode, r.stderr[-2000:])


def test_valid_spm_vocabulary_still_loads_and_tokenizes(seeds, tmp_path):
    """The vocabulary checks are not stricter than they must be: an SPM vocabulary with its byte tokens runs."""
    import leank

    parts = seeds["plain"]
    tokens = tokens_of(parts)
    tokens[:256] = [b"<0x%02X>" % b for b in range(256)]
    path = craft(parts, tmp_path / "spm.gguf", {"tokenizer.ggml.tokens": (ARR, tokens, STR),
                                               "tokenizer.ggml.model": (STR, b"llama", None),
                                               "tokenizer.ggml.token_type": (ARR, [6] * 256 + [1] * (len(tokens) - 256), I32)})
    m = leank.load(path, device="cpu")
    ids = m.tokenize("héllo wörld ✓")
    assert ids and all(0 <= i < m.args.vocab_size for i in ids)
    assert "".join(m.generate(ids, max_tokens=3, temperature=0)) is not None


LEANK_CASES = {  # on a converted file: forged or damaged leank.* metadata
    "mask align NaN": ({"leank.mask.align": (F32, NAN, None)}, "not a number within"),
    "mask steps infinite": ({"leank.mask.steps": (F32, INF, None)}, "not a number within"),
    "provenance JSON nested 5000 deep": ({"leank.mask.extra": (STR, b"[" * 5000, None)}, "not a JSON object"),
    "schema version 0": ({"leank.version": (U32, 0, None)}, "no valid leank.version"),
    "method as a long array": ({"leank.mask.method": (ARR, list(range(1000)), I32)}, "holds 1000 items"),
    "mask for another shape": ({"leank.mask.shape": (ARR, [1000, 1, 16], I32)}, "does not fit"),
    "mask bits not bytes": ({"leank.mask.bits": (ARR, [0.5] * 4, F32)}, "not bytes"),
    "bits setting absurd": ({"leank.cache.k_bits": (U32, 2**31, None)}, "not a valid setting"),
}


@pytest.mark.parametrize("case", list(LEANK_CASES))
def test_forged_leank_metadata_is_one_line_error(seeds, tmp_path, case):
    values, fragment = LEANK_CASES[case]
    path = craft(seeds["converted"], tmp_path / "forged.gguf", values)
    with pytest.raises(LeankError, match=fragment) as info:
        open_everything(path)
    assert "\n" not in str(info.value)


def test_tensor_named_with_a_unicode_digit_cannot_crash_the_fingerprint(seeds, tmp_path):
    """`"²".isdigit()` is True but `int("²")` fails: the K fingerprint used to crash on such a layer name."""
    def add(p):
        size = 64 * 2
        p.data = p.data + bytes(size)
        last = p.tensors[-1]
        end = len(p.data) - size
        p.tensors.append(dict(name="blk.².attn_k.weight".encode(), dims=[64], type=1, offset=end))
        assert end % p.alignment == 0 and end >= last["offset"]

    path = craft(seeds["converted"], tmp_path / "digit.gguf", tensors=add)
    with pytest.raises(LeankError, match="different model"):
        open_everything(path)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    from leank.runtime.gguf.reader import GGUFFile

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(LeankError, match="not a regular file"):
        GGUFFile(fifo)


# --- chat templates ----------------------------------------------------------------------------------------
REACHING_FOR_INTERNALS = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ messages[0].content.__class__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ cycler(1, 2).__class__ }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ __import__('os').system('id') }}",
    "{{ 'a'.upper.__self__ }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
    "{{ '{0.__init__.__globals__[os]}'.format_map({'0': joiner}) }}",
    "{{ messages|attr('__class__') }}",
    "{{ messages|selectattr('__class__')|list }}",
    "{{ range.__globals__ }}",
    "{{ (messages|first).__class__.__base__ }}",
]


@pytest.mark.parametrize("source", REACHING_FOR_INTERNALS)
def test_template_reaching_for_python_internals_fails_safely(source, tmp_path):
    from leank.runtime.text.template import ChatTemplate

    marker = tmp_path / "pwned"
    t = ChatTemplate(source.replace("'id'", f"'touch {marker}'"), "<s>", "</s>")
    with pytest.raises(LeankError) as info:
        t.render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(info.value) and not marker.exists()


RESOURCE_ATTACKS = [  # each used to run for minutes or allocate hundreds of MB to GB before failing or rendering
    "{{ range(10**9)|list }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for a in messages[0].content * 1000 %}{% for b in messages[0].content * 1000 %}{% endfor %}{% endfor %}",
    "{{ 'x' * 100000000 }}",
    "{{ [1] * 10**9 }}",
    "{{ 'x'.ljust(300000000) }}",
    "{{ 'x'|center(300000000) }}",
    "{{ 'x'.zfill(300000000) }}",
    "{{ '%300000000s'|format('x') }}",
    "{{ '{:>300000000}'.format(1) }}",
    "{{ '{:>{w}}'.format(1, w=300000000) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{{ ('x' * 10000000)|replace('x', 'yyy') }}",
    "{{ (('x' * 4000)|list)|join('y' * 8000) }}",
    "{{ lipsum(10**6) }}",
    "{{ 2 ** 100000 }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
]


@pytest.mark.parametrize("source", RESOURCE_ATTACKS)
def test_template_resource_attacks_are_bounded(source, monkeypatch):
    import leank.runtime.text.template as tokenizer

    monkeypatch.setattr(tokenizer, "MAX_TEMPLATE_STEPS", 200_000)  # the default (10^6) takes ~2 s per attack
    t = tokenizer.ChatTemplate(source, "<s>", "</s>")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(LeankError) as info:
        t.render([{"role": "user", "content": "hi " * 50}])
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 150 * 1024, "more than 150 MB allocated"
    assert "\n" not in str(info.value)


LLAMA3_LIKE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content']|trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system + "<|eot_id|>" }}
{%- set ns = namespace(n=0) %}
{%- for message in messages %}{%- set ns.n = ns.n + 1 %}
    {%- if not (message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}{%- if loop.last and message.tool_calls is defined %}X{% endif %}
{%- endfor %}
{{- ns.n ~ '/' ~ messages|length ~ (tools|tojson) }}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""


@pytest.mark.parametrize("source", ["chatml", "llama3-like"])
def test_ordinary_templates_render_exactly_as_the_plain_sandbox(source):
    """The guards change nothing for a well-behaved template."""
    import json

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from leank.convert.synthetic import CHATML
    from leank.runtime.text.template import ChatTemplate

    text = CHATML if source == "chatml" else LLAMA3_LIKE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi {{x}} ' \" é"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again " * 500}] * 20
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    expected = env.from_string(text).render(messages=messages, add_generation_prompt=True, bos_token="<s>",
                                            eos_token="</s>", tools=None)
    assert ChatTemplate(text, "<s>", "</s>").render(messages) == expected


# --- pickles ---------------------------------------------------------------------------------------------
def _reduce_pickle(command: str, protocol: int = 2) -> bytes:
    """A pickle that calls os.system(command) when loaded, written opcode by opcode."""
    if protocol >= 4:  # STACK_GLOBAL
        return (b"\x80\x04" + b"\x8c\x02os\x94" + b"\x8c\x06system\x94" + b"\x93" + b"\x8c" + bytes([len(command)])
                + command.encode() + b"\x85R.")
    return b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command.encode() + b"\x85R."


def _torch_zip_with(data_pkl: bytes, path: Path) -> None:
    """A valid torch zip whose data.pkl is replaced."""
    torch.save(torch.ones(2, 2, 64), path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(path, "w") as z:
        for name, body in members.items():
            z.writestr(name, data_pkl if name.endswith("data.pkl") else body)


PICKLES = ["raw REDUCE os.system", "raw STACK_GLOBAL os.system", "raw INST builtins.exec", "raw posix.system",
           "torch zip, data.pkl calls os.system", "torch zip, data.pkl calls builtins.eval", "legacy torch format"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", PICKLES)
def test_malicious_pth_never_runs_its_payload(tmp_path, kind):
    from leank.masks.importers import import_leank_pth

    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    path = tmp_path / "evil.pth"
    if kind == "raw REDUCE os.system":
        path.write_bytes(_reduce_pickle(command))
    elif kind == "raw STACK_GLOBAL os.system":
        path.write_bytes(_reduce_pickle(command, protocol=4))
    elif kind == "raw INST builtins.exec":
        code = f"import os; os.system({command!r})"
        path.write_bytes(b"(S" + repr(code).encode() + b"\nibuiltins\nexec\n.")
    elif kind == "raw posix.system":
        path.write_bytes(_reduce_pickle(command).replace(b"cos\n", b"cposix\n"))
    elif kind == "torch zip, data.pkl calls os.system":
        _torch_zip_with(_reduce_pickle(command), path)
    elif kind == "torch zip, data.pkl calls builtins.eval":
        expr = f"__import__('os').system({command!r})"
        _torch_zip_with(b"\x80\x02cbuiltins\neval\nX" + struct.pack("<I", len(expr)) + expr.encode() + b"\x85R.", path)
    else:  # the pre-zip format: a sequence of pickles, the first one malicious
        path.write_bytes(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19." + _reduce_pickle(command))
    with pytest.raises(LeankError, match="not a loadable tensor file") as info:
        import_leank_pth(path, "llama")
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the pickle's payload ran"


def _zip_bomb(path: Path, nbytes: int) -> None:
    """A torch zip of an nbytes float tensor of zeros, its members deflated: a few hundred KB on disk."""
    import io

    buf = io.BytesIO()
    torch.save(torch.zeros(nbytes // 4), buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info.filename))


def test_pth_zip_bomb_is_refused_before_it_expands(tmp_path):
    bomb = tmp_path / "bomb.pth"
    _zip_bomb(bomb, 256 << 20)
    assert bomb.stat().st_size < 1 << 20
    script = ("import sys; from leank.masks.importers import import_leank_pth; from leank.errors import LeankError\n"
              "def hwm(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
              "before = hwm()\n"
              "try: import_leank_pth(sys.argv[1], 'llama')\nexcept LeankError: pass\n"
              "print((hwm() - before) // 1024)")
    r = subprocess.run([sys.executable, "-c", script, str(bomb)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) < 64, f"importing a {bomb.stat().st_size}-byte file took {r.stdout.split()[-1]} MB"


@pytest.mark.parametrize("provenance", ["[1]", '{"align": 1e999}', '{"ratio": NaN}', '{"steps": "10"}', "[" * 5000])
def test_native_mask_with_hostile_provenance_is_one_line_error(tmp_path, provenance):
    from safetensors.torch import save_file

    from leank.runtime.cache.mask import Mask

    path = tmp_path / "m.safetensors"
    save_file({"kept": torch.ones(2, 2, 64, dtype=torch.uint8)}, str(path),
              metadata={"format": "leank-mask", "version": "1", "provenance": provenance})
    with pytest.raises(LeankError, match="provenance") as e:
        Mask.load(path)
    assert "\n" not in str(e.value)
