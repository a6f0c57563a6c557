"""The `leank` command as a user runs it: a subprocess, real files, exit codes and one-line errors."""
import json
import os
import subprocess
import sys

import pytest

LEANK = [sys.executable, "-m", "leank.cli"]


def run(*args, stdin=None, timeout=300):
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(LEANK + [str(a) for a in args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(r, *fragments):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_help_lists_the_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("chat", "generate", "perplexity", "info"):
        assert cmd in r.stdout


def test_missing_file(tmp_path):
    assert_one_line_error(run("info", tmp_path / "nope.gguf"), "no such file")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, not a model at all" * 10)
    assert_one_line_error(run("generate", p, "-p", "hi"), "not a GGUF file")


def test_truncated_gguf(tiny_llama, tmp_path):
    data = tiny_llama.read_bytes()
    for cut in (30, len(data) // 3, len(data) - 100):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        r = run("generate", p, "-p", "hi")
        assert_one_line_error(r)
        assert "truncated" in r.stderr or "damaged" in r.stderr


def test_unsupported_architecture(tmp_path):
    from leank.convert.synthetic import TinySpec, write_tiny_model

    p = write_tiny_model(tmp_path / "gemma.gguf", TinySpec(arch="gemma"))
    assert_one_line_error(run("info", p), "'gemma' is not supported", "llama", "qwen2")


def test_debug_shows_the_traceback(tmp_path):
    r = run("--debug", "info", tmp_path / "nope.gguf")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_prompt_longer_than_context(make_tiny):
    p = make_tiny(context_length=64)
    assert_one_line_error(run("generate", p, "-p", "word " * 100), "context")


def test_generate_json(tiny_llama):
    r = run("generate", tiny_llama, "-p", "hello", "-n", "5", "-t", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generated_tokens"] <= 5 and out["finish_reason"] in ("length", "stop")
    assert out["cache"]["tokens"] >= 1


def test_chat_reads_one_turn_per_line_from_a_pipe(tiny_llama):
    r = run("chat", tiny_llama, "-n", "6", "-t", "0", "--json", stdin="hello\n/stats\nhow are you\n")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert [t["user"] for t in turns] == ["hello", "how are you"]  # /stats is a command, not a turn
    assert all(t["generated_tokens"] >= 1 for t in turns)
    assert turns[1]["cache"]["tokens"] > turns[0]["cache"]["tokens"]  # the conversation continues
    assert "KV cache" in r.stderr


def test_perplexity_json_and_decode_mode(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    a = json.loads(run("perplexity", tiny_llama, "--file", text, "--ctx", "64", "--json").stdout)
    b = json.loads(run("perplexity", tiny_llama, "--file", text, "--ctx", "64", "--json", "--decode").stdout)
    assert a["scored"] == b["scored"] == 63
    assert abs(a["perplexity"] - b["perplexity"]) < 1e-3 * a["perplexity"]  # dense: both paths agree


def test_impossible_policies_fail_before_work(tiny_llama):
    assert_one_line_error(run("generate", tiny_llama, "-p", "hi", "--kv", "kivi", "--k-bits", "3"), "bits")
    assert_one_line_error(run("generate", tiny_llama, "-p", "hi", "--kv", "kivi", "--group-size", "24"), "group")
    assert_one_line_error(run("generate", tiny_llama, "-p", "hi", "--kv", "leank", "--sink", "2000", "--recent", "100"),
                          "context")
    assert_one_line_error(run("generate", tiny_llama, "-p", "hi", "--kv", "bogus"), "--kv")
