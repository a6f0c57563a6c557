"""The `leank` command as a user runs it: real files, exit codes, one-line errors, and the chat through a
pseudo-terminal. Most runs are in-process (`leank_cli`); what only a real process shows (signals, the
installed entry point's exit status, a terminal) runs in one (`leank_process`, pexpect)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from leank.runtime.outputs import temporary_path


def assert_one_line_error(r, *fragments, code=None):
    assert r.returncode != 0 if code is None else r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "unexpected" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


# --- help, version, usage errors (exit 2) -----------------------------------------------------------------
def test_help_lists_the_commands_and_leank_alone_is_help(leank_cli):
    for args in (["--help"], []):
        r = leank_cli(*args)
        assert r.returncode == 0, r.stderr
        for cmd in ("chat", "generate", "perplexity", "info", "convert", "mask"):
            assert cmd in r.stdout
        assert "error" not in r.stderr
    r = leank_cli("mask")
    assert r.returncode == 0 and "train" in r.stdout and r.stderr == ""


def test_help_shows_flags_without_value_placeholders(leank_cli):
    r = leank_cli("generate", "-h")
    assert r.returncode == 0
    assert "<bool>" not in r.stdout
    line = next(l for l in r.stdout.splitlines() if "--json" in l)
    assert line.split()[0] == "--json" and line.split()[1] == "Print"  # no value after the flag
    for flag in ("--temp", "--min-p", "--repeat-penalty", "--presence-penalty", "--frequency-penalty", "-c, --ctx-size",
                 "-m, --model", "-t, --threads", "-f, --file"):
        assert flag in r.stdout, flag


def test_version(leank_cli):
    import leank

    r = leank_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"leank {leank.__version__}"


@pytest.mark.parametrize("args, message", [
    (["generate", "-n", "0"], "error: --max-tokens: must be >= 1 (got 0)"),
    (["generate", "--max-tokens", "abc"], "error: --max-tokens: must be a whole number (got abc)"),
    (["generate", "--top-p", "2"], "error: --top-p: must be <= 1.0 (got 2)"),
    (["generate", "--temp", "-1"], "error: --temp: must be >= 0.0 (got -1)"),
    (["chat", "--ctx-size", "0"], "error: --ctx-size: must be >= 1 (got 0)"),
    (["info", "--ctx", "-1"], "error: --ctx-size: must be >= 1 (got -1)"),
    (["info", "--ratio", "abc"], "error: --ratio: must be a number (got abc)"),
    (["generate", "--bogus-option"], "error: --bogus-option: no such option"),
    (["generate", "-n"], "error: -n: needs a value"),
    (["mask", "make"], "error: missing argument SPEC"),
    (["mask", "make", "freq:0.5"], "error: missing option --output"),
    (["gen"], "error: no such command 'gen'; the commands are chat, generate"),
    (["info", "model.gguf", "--json", "true"], "error: true: one argument too many"),
    (["--threads", "0", "info"], "error: --threads: must be >= 1 (got 0)"),
    (["info", "-t", "0"], "error: --threads: must be >= 1 (got 0)"),
    # values checked against their choices before any work: a usage error naming the option
    (["info", "--kv", "bogus"], "error: --kv: must be dense, leank, kivi or leank+kivi (got bogus)"),
    (["generate", "--k-bits", "3"], "error: --k-bits: must be 2, 4, 8 or 16 (got 3)"),
    (["chat", "--group-size", "0"], "error: --group-size: must be >= 1 (got 0)"),
    (["convert", "--align", "7"], "error: --align: must be 1, 8, 16 or 32 (got 7)"),
    (["generate", "--dtype", "int8"], "error: --dtype: must be auto, float32"),
    (["eval", "-T", "passkey", "-T", "bogus"], "error: --task: must be passkey, multikey, multivalue or vartrack"),
    (["eval", "--protocol", "both"], "error: --protocol: must be conversation or prefill (got both)"),
    (["mask", "show", "m.safetensors", "--arch", "gemma"], "error: --arch: must be llama, qwen2 or qwen3 (got gemma)"),
    (["mask", "train", "--stage", "3"], "error: --stage: must be 1, 2 or both (got 3)"),
    (["mask", "train", "--lr", "-1"], "error: --lr: must be >= 0.0 (got -1)"),
    (["mask", "train", "--sink", "-1"], "error: --sink: must be >= 0 (got -1)"),
    # a missing input or output the command cannot do without
    (["convert"], "error: --output: no output file"),
    (["mask", "train"], "error: --output: pass --output"),
    (["mask", "examples"], "error: --output: pass --output"),
    (["generate"], "error: --prompt: no prompt"),
    (["perplexity"], "error: --file: no text to score"),
])
def test_usage_errors_name_the_option_and_exit_2(leank_cli, args, message):
    r = leank_cli(*args)
    assert_one_line_error(r, code=2)
    assert r.stderr.strip().startswith(message), r.stderr


@pytest.mark.parametrize("args, message, code", [
    # a SPEC's own grammar is a usage error (2); a SPEC naming a file that is not there is a missing input (1)
    (["eval", "-p", "kivi3", "-l", "64"], "error: policy 'kivi3': KIVI bits must be 2, 4 or 8", 2),
    (["eval", "-p", "kivi2,foo=1", "-l", "64"], "error: policy 'kivi2,foo=1': 'foo=1' is not an option", 2),
    (["eval", "-p", "bogus:spec", "-l", "64"], "error: policy 'bogus:spec': expected dense, kiviN", 2),
    (["eval", "-p", "dense", "-p", "dense", "-l", "64"], "error: policy 'dense' is given twice", 2),
    (["generate", "--mask", "freq:2.0", "-n", "1", "--prompt", "hi"], "error: mask spec 'freq:2.0': the ratio", 2),
    (["generate", "--mask", "nothere.safetensors", "-n", "1", "--prompt", "hi"], "error: mask 'nothere.safetensors': no such file", 1),
])
def test_spec_errors(leank_cli, tiny_llama, args, message, code):
    r = leank_cli(*args[:1], str(tiny_llama), *args[1:])
    assert_one_line_error(r, code=code)
    assert r.stderr.strip().startswith(message), r.stderr


def test_usage_errors_from_the_installed_entry_point(leank_process):
    """The real process: exit status 2 and one line, whichever click package typer brings."""
    r = leank_process("generate", "-n", "0")
    assert_one_line_error(r, "--max-tokens: must be >= 1 (got 0)", code=2)
    r = leank_process()
    assert r.returncode == 0 and "Commands" in r.stdout and r.stderr == ""


def test_model_given_twice_differently_is_a_usage_error(leank_cli, tiny_llama, tmp_path):
    r = leank_cli("info", tiny_llama, "-m", tmp_path / "other.gguf")
    assert_one_line_error(r, "--model", "given twice", code=2)
    assert leank_cli("info", "-m", tiny_llama, "--json").returncode == 0  # -m alone is MODEL


# --- runtime errors (exit 1) --------------------------------------------------------------------------------
def test_missing_file(leank_cli, tmp_path):
    assert_one_line_error(leank_cli("info", tmp_path / "nope.gguf"), "no such file", code=1)


def test_not_a_gguf(leank_cli, tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, not a model at all" * 10)
    assert_one_line_error(leank_cli("generate", p, "-p", "hi"), "not a GGUF file", code=1)


def test_truncated_gguf(leank_cli, tiny_llama, tmp_path):
    data = tiny_llama.read_bytes()
    for cut in (30, len(data) // 3, len(data) - 100):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        r = leank_cli("generate", p, "-p", "hi")
        assert_one_line_error(r, code=1)
        assert "truncated" in r.stderr or "damaged" in r.stderr


def test_unsupported_architecture(leank_cli, tmp_path):
    from leank.convert.synthetic import TinySpec, write_tiny_model

    p = write_tiny_model(tmp_path / "gemma.gguf", TinySpec(arch="gemma"))
    assert_one_line_error(leank_cli("info", p), "'gemma' is not supported", "llama", "qwen2")


def test_debug_shows_the_traceback(leank_process, tmp_path):
    r = leank_process("--debug", "info", tmp_path / "nope.gguf")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = leank_process("info", tmp_path / "nope.gguf", "--debug")  # after the verb too
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_prompt_longer_than_context(leank_cli, make_tiny):
    p = make_tiny(context_length=64)
    assert_one_line_error(leank_cli("generate", p, "-p", "word " * 100), "context")
    assert_one_line_error(leank_cli("generate", p, "-p", "hi", "-c", "100"), "--ctx-size 100 exceeds", "64")


def test_impossible_policies_fail_before_work(leank_cli, tiny_llama):
    g = ("generate", tiny_llama, "-p", "hi")
    assert_one_line_error(leank_cli(*g, "--kv", "kivi", "--k-bits", "3"), "bits")
    assert_one_line_error(leank_cli(*g, "--kv", "kivi", "--group-size", "24"), "group")
    assert_one_line_error(leank_cli(*g, "--kv", "leank", "--sink", "2000", "--recent", "100"), "context")
    assert_one_line_error(leank_cli(*g, "--kv", "bogus"), "--kv")


def test_careless_values_get_one_clear_line(leank_cli, tiny_llama, tmp_path):
    assert_one_line_error(leank_cli("generate", tiny_llama, "-p", "hi", "--device", "tpu"),
                          "--device: must be cpu, cuda, cuda:N or auto (got tpu)", code=2)
    assert_one_line_error(leank_cli("generate", tiny_llama, "-p", "hi", "--kv", "leank", "--mask", tmp_path),
                          "--mask", "is a directory", code=1)
    assert_one_line_error(leank_cli("mask", "show", tmp_path), "is a directory", code=1)
    assert_one_line_error(leank_cli("info", tmp_path), "is a directory", code=1)
    assert_one_line_error(leank_cli("mask", "train", tiny_llama, "-o", tmp_path / "m.st", "--data", tmp_path),
                          "--data", "is a directory", code=1)


def test_foreign_wording_stays_out_of_errors(leank_cli, tiny_llama, tmp_path):
    """Damaged inputs are named in leank's words, not a library's exception class or message."""
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a tensor file")
    pth = tmp_path / "junk.pth"
    pth.write_text("not a torch file")
    for args in (["info", junk], ["mask", "show", junk], ["mask", "show", pth, "--arch", "llama"],
                 ["chat", tiny_llama, "--session", junk], ["mask", "train", tiny_llama, "-o", tmp_path / "t.st",
                                                           "--data", junk, "--steps", "1"]):
        r = leank_cli(*args)
        assert_one_line_error(r, code=1)
        for word in ("b'GGUF'", "Error:", "Error)", "Weights only", "torch.load"):
            assert word not in r.stderr, (args, r.stderr)


def test_inputs_that_are_pipes_or_missing_are_refused_without_blocking(leank_process, tiny_llama, tmp_path):
    """A named pipe given as a mask or training data would block a plain open(): refused with one line."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for args in (["generate", tiny_llama, "-p", "hi", "--kv", "leank", "--mask", pipe], ["mask", "show", pipe],
                 ["mask", "train", tiny_llama, "-o", tmp_path / "t.st", "--data", pipe, "--steps", "1"]):
        assert_one_line_error(leank_process(*args, timeout=120), "not a regular file", code=1)
    r = leank_process("mask", "train", tiny_llama, "-o", tmp_path / "t.st", "--data", tmp_path / "none", "--steps", "1")
    assert_one_line_error(r, "no such file", code=1)


def test_examples_with_min_tokens_over_max_tokens(leank_cli, tiny_llama, tmp_path):
    r = leank_cli("mask", "examples", tiny_llama, "-o", tmp_path / "ex.bin", "-n", "1", "--min-tokens", "500",
                  "--max-tokens", "100")
    assert_one_line_error(r, "--min-tokens 500 exceeds --max-tokens 100", code=1)
    assert not (tmp_path / "ex.bin").exists()


def test_standard_input_closed(tiny_llama):
    """`leank chat <&-`: no standard input at all reads as an empty one."""
    for args, code in ((["chat", tiny_llama, "-n", "2"], 0), (["generate", tiny_llama, "-p", "-"], 1)):
        r = subprocess.run([sys.executable, "-m", "leank.cli", *map(str, args)], capture_output=True, text=True,
                           timeout=300, preexec_fn=lambda: os.close(0))
        assert r.returncode == code and "Traceback" not in r.stderr and "unexpected" not in r.stderr, r.stderr
        assert code == 0 or r.stderr.strip() == "error: no prompt: standard input is empty"


def test_serve_on_a_port_in_use_is_one_line(leank_process, tiny_llama):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = leank_process("serve", tiny_llama, "--port", taken.getsockname()[1], timeout=120)
    assert_one_line_error(r, "cannot listen on 127.0.0.1:", "address already in use", code=1)
    r = leank_process("serve", tiny_llama, "--host", "no-such-host.invalid", timeout=120)
    assert_one_line_error(r, "cannot listen on no-such-host.invalid", code=1)


def test_prompt_file_errors(leank_cli, tiny_llama, tmp_path):
    assert_one_line_error(leank_cli("generate", tiny_llama, "-f", tmp_path / "none.txt"), "--file", "no such file")
    assert_one_line_error(leank_cli("generate", tiny_llama, "-f", tmp_path), "is a directory")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert_one_line_error(leank_cli("generate", tiny_llama, "-f", bad), "not UTF-8")
    assert_one_line_error(leank_cli("generate", tiny_llama, "-f", bad, "-p", "x"), "not both")


# --- generation ----------------------------------------------------------------------------------------------
def test_generate_json(leank_cli, tiny_llama):
    r = leank_cli("generate", tiny_llama, "-p", "hello", "-n", "5", "--temp", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generated_tokens"] <= 5 and out["finish_reason"] in ("length", "stop")
    assert out["cache"]["tokens"] >= 1


def test_generate_reads_the_prompt_file_and_caps_at_ctx_size(leank_cli, tiny_llama, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello there")
    a = json.loads(leank_cli("generate", "-m", tiny_llama, "-f", prompt, "-n", "8", "--temp", "0", "--json",
                             "--min-p", "0").stdout)
    b = json.loads(leank_cli("generate", tiny_llama, "-p", "hello there", "-n", "8", "--temp", "0", "--json").stdout)
    assert a["text"] == b["text"] and a["prompt_tokens"] == b["prompt_tokens"]  # the file is the prompt
    c = json.loads(leank_cli("generate", tiny_llama, "-f", prompt, "-n", "200", "--temp", "0", "--json",
                             "-c", str(a["prompt_tokens"] + 3)).stdout)
    assert c["generated_tokens"] <= 3  # --ctx-size bounds prompt plus reply


def test_threads_on_every_verb(leank_cli, tiny_llama):
    import torch

    seen = []
    real = torch.set_num_threads
    try:
        torch.set_num_threads = lambda n: (seen.append(n), real(n))
        assert leank_cli("info", tiny_llama, "-t", "1", "--json").returncode == 0
        assert leank_cli("-t", "1", "info", tiny_llama, "--json").returncode == 0
    finally:
        torch.set_num_threads = real
    assert seen.count(1) >= 2


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    import leank.cli.options as options

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for average, running, threads in ((0.1, 0, 2), (1.2, 1, 1), (5.0, 4, 1), (1.4, 0, 2), (0.2, 3, 2)):
        monkeypatch.setattr(os, "getloadavg", lambda: (average, average, average))
        real_open = open

        def fake_open(path, *args, **kwargs):
            if path == "/proc/loadavg":
                import io

                return io.StringIO(f"{average} {average} {average} {running + 1}/300 12345")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", fake_open)
        assert options.default_threads() == threads, (average, running)
        monkeypatch.setattr("builtins.open", real_open)


# --- output files: never destroy data ------------------------------------------------------------------------
def digest(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_temporaries(directory):
    return [p.name for p in directory.iterdir() if ".leank-tmp-" in p.name] == []


@pytest.fixture
def mask_file(tmp_path, tiny_llama, leank_cli):
    out = tmp_path / "m.safetensors"
    r = leank_cli("mask", "make", "freq:0.5", "-m", tiny_llama, "--align", "8", "-o", out)
    assert r.returncode == 0, r.stderr
    return out


def writer_commands(model, mask, tmp):
    """Every command that writes a file, as (name, args before the output option, output option, args after)."""
    text = tmp / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    return {
        "convert": (["convert", model, "--mask", "ones"], "-o", []),
        "mask make": (["mask", "make", "freq:0.5", "-m", model, "--align", "8"], "-o", []),
        "mask show": (["mask", "show", mask], "--png", []),
        "mask examples": (["mask", "examples", model, "-n", "1", "--min-tokens", "700", "--max-tokens", "800"], "-o",
                          []),
        "mask train": (["mask", "train", model, "--steps", "1", "--min-tokens", "700", "--max-tokens", "800",
                        "--sink", "8", "--recent", "16", "--ratio", "0.5", "--align", "8", "--device", "cpu"], "-o", []),
        "eval": (["eval", model, "--length", "600", "--policy", "dense", "--sink", "4", "--recent", "32"], "--json-out",
                 []),
    }


WRITERS = ["convert", "mask make", "mask show", "mask examples", "mask train", "eval"]


@pytest.mark.parametrize("writer", WRITERS)
def test_writers_refuse_an_existing_file_without_force(writer, leank_cli, make_tiny, mask_file, tmp_path):
    model = make_tiny()
    before, option, after = writer_commands(model, mask_file, tmp_path)[writer]
    target = tmp_path / "existing.out"
    target.write_bytes(b"precious data")
    r = leank_cli(*before, option, target, *after)
    assert_one_line_error(r, option, "already exists", "--force")
    assert target.read_bytes() == b"precious data"
    assert no_temporaries(tmp_path)


@pytest.mark.parametrize("writer", WRITERS)
def test_writers_never_replace_an_input(writer, leank_cli, make_tiny, mask_file, tmp_path):
    model = make_tiny()
    before, option, after = writer_commands(model, mask_file, tmp_path)[writer]
    src = mask_file if writer == "mask show" else model
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    for name in (src, link, f"{src.parent}/./{src.name}"):  # the file itself, a symbolic link, ./
        hashed = digest(src)
        r = leank_cli(*before, option, name, *after, "--force")
        assert_one_line_error(r, "is an input of this command")
        assert digest(src) == hashed
    assert no_temporaries(tmp_path) and no_temporaries(src.parent)


@pytest.mark.parametrize("writer", WRITERS)
def test_writers_refuse_directories_devices_pipes_and_sockets(writer, leank_cli, make_tiny, mask_file, tmp_path):
    model = make_tiny()
    before, option, after = writer_commands(model, mask_file, tmp_path)[writer]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for target, kind in ((tmp_path, "a directory"), ("/dev/null", "a device"), (fifo, "a named pipe"),
                             (sock_path, "a socket")):
            r = leank_cli(*before, option, target, *after, "--force")
            assert_one_line_error(r, kind)
        assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
        assert fifo.is_fifo() and sock_path.is_socket()
    finally:
        sock.close()


@pytest.mark.parametrize("writer", WRITERS)
def test_writers_check_the_directory_before_the_work(writer, leank_cli, make_tiny, mask_file, tmp_path, monkeypatch):
    model = make_tiny()
    before, option, after = writer_commands(model, mask_file, tmp_path)[writer]
    import leank.cli.mask_train
    import leank.cli.options

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(leank.cli.options, "load", no_loading)
    monkeypatch.setattr(leank.cli.mask_train, "load", no_loading)
    r = leank_cli(*before, option, tmp_path / "no" / "such" / "dir" / "out", *after)
    assert_one_line_error(r, "does not exist")


@pytest.mark.parametrize("writer", WRITERS)
def test_writers_write_a_new_file_and_replace_with_force(writer, leank_cli, make_tiny, mask_file, tmp_path):
    model = make_tiny()
    before, option, after = writer_commands(model, mask_file, tmp_path)[writer]
    target = tmp_path / "out" / "result.bin"
    target.parent.mkdir()
    r = leank_cli(*before, option, target, *after)
    assert r.returncode == 0, r.stderr
    first = target.read_bytes()
    assert len(first) > 0
    target.write_bytes(b"old")
    r = leank_cli(*before, option, target, *after, "--force")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() != b"old" and no_temporaries(target.parent)
    # a symbolic link as the output is followed: the file it names is replaced, the link stays
    link = tmp_path / "out" / "link.bin"
    link.symlink_to(target)
    assert leank_cli(*before, option, link, *after, "--force").returncode == 0
    assert link.is_symlink() and target.stat().st_size > 3


def test_mask_train_refuses_to_overwrite_its_checkpoint(leank_cli, make_tiny, tmp_path):
    model = make_tiny()
    out = tmp_path / "m.safetensors"
    ckpt = tmp_path / "m.safetensors.ckpt"
    ckpt.write_bytes(b"hours of training")
    r = leank_cli("mask", "train", model, "--steps", "1", "-o", out)
    assert_one_line_error(r, "--checkpoint", "--resume", "--force")
    assert ckpt.read_bytes() == b"hours of training"
    r = leank_cli("mask", "train", model, "--steps", "1", "-o", out, "--checkpoint", model)
    assert_one_line_error(r, "--checkpoint", "is an input")


def test_ctrl_c_removes_the_temporary_file(tmp_path):
    """Ctrl-C (KeyboardInterrupt) while a writer writes: the old file stays, no temporary is left."""
    from leank.runtime.outputs import atomic_write

    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target, force=True) as tmp:
            tmp.write_bytes(b"half of the new")
            assert tmp == temporary_path(target)
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and no_temporaries(tmp_path)


def test_interrupted_conversion_exits_130_and_leaves_no_file(leank_process, make_tiny, tmp_path):
    """A real SIGINT in the middle of `leank convert`: exit 130, `interrupted`, no output, no temporary."""
    src = make_tiny(n_layers=4, dim=1024, n_heads=8, n_kv_heads=2, ffn_dim=2816, fast_weights=True)
    out = tmp_path / "out.gguf"
    p = subprocess.Popen([sys.executable, "-m", "leank.cli", "convert", str(src), "--mask", "ones", "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(".leank-tmp-" in q.name for q in tmp_path.iterdir()) and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=120)
    if p.returncode == 0:  # the copy finished before the signal landed: nothing to check
        pytest.skip("the conversion finished before Ctrl-C")
    assert p.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in stderr
    assert not out.exists() and no_temporaries(tmp_path)


# --- chat ------------------------------------------------------------------------------------------------
def test_chat_reads_one_turn_per_line_from_a_pipe(leank_cli, tiny_llama):
    r = leank_cli("chat", tiny_llama, "-n", "6", "--temp", "0", "--json", stdin="hello\n/stats\nhow are you\n")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert [t["user"] for t in turns] == ["hello", "how are you"]  # /stats is a command, not a turn
    assert all(t["generated_tokens"] >= 1 for t in turns)
    assert turns[1]["cache"]["tokens"] > turns[0]["cache"]["tokens"]  # the conversation continues
    assert "KV cache" in r.stderr


def test_chat_blocks_files_and_unknown_commands(leank_cli, tiny_llama, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("first line of the document\nsecond line\n")
    stdin = ('"""\nline one\nline two\n"""\n'
             f"/file {doc}\n"
             f"/file {tmp_path / 'missing.txt'}\n"
             "/exti\n"
             "//etc is a folder\n")
    r = leank_cli("chat", tiny_llama, "-n", "3", "--temp", "0", "--json", stdin=stdin)
    assert r.returncode == 0, r.stderr
    users = [json.loads(line)["user"] for line in r.stdout.splitlines()]
    assert users == ["line one\nline two", "first line of the document\nsecond line\n", "/etc is a folder"]
    assert "unknown command /exti" in r.stderr and "missing.txt: no such file" in r.stderr


def test_chat_stop_strings_and_ctx_size(leank_cli, tiny_llama):
    free = json.loads(leank_cli("chat", tiny_llama, "-n", "12", "--temp", "0", "--json", stdin="hello\n").stdout)
    text = free["assistant"]
    assert len(text) > 4
    stop = text[2:4]
    r = leank_cli("chat", tiny_llama, "-n", "12", "--temp", "0", "--json", "--stop", stop, stdin="hello\n")
    stopped = json.loads(r.stdout)
    assert stopped["assistant"] == text[: text.index(stop)] and stopped["finish_reason"] == "stop"
    r = leank_cli("chat", tiny_llama, "-n", "4", "--temp", "0", "-c", "10", stdin="hello there, how are you?\n")
    assert_one_line_error(r, "context of 10 tokens")


pexpect = pytest.importorskip("pexpect")
PROMPT = r"\x1b\[\?2004h"  # prompt_toolkit turns bracketed paste on as each prompt starts


def spawn_chat(model, *args):
    env = dict(os.environ, COLUMNS="120", LINES="40", TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    return pexpect.spawn(sys.executable, ["-m", "leank.cli", "chat", str(model), "--json", *args], env=env,
                         encoding="utf-8", timeout=40, dimensions=(40, 120))


def test_chat_in_a_terminal_edits_like_a_shell(tiny_llama):
    """Through a pseudo-terminal: arrow keys edit the line (not sent to the model as ^[[D), Up recalls the
    last line, a bracketed paste of two lines is one turn, unknown commands are answered by chat."""
    child = spawn_chat(tiny_llama, "-n", "4", "--temp", "0")
    try:
        child.expect(PROMPT)
        child.send("helo")
        child.send("\x1b[D\x1b[D")  # Left, Left: the cursor moves back over "lo"
        child.send("l\r")  # "hel|lo"
        child.expect(r'"user": "(.*?)", "assistant"')
        assert child.match.group(1) == "hello"
        child.expect(PROMPT)
        child.send("\x1b[A")  # Up: the previous line comes back
        child.send("!\r")
        child.expect(r'"user": "(.*?)", "assistant"')
        assert child.match.group(1) == "hello!"
        child.expect(PROMPT)
        child.send("\x1b[200~first pasted line\rsecond pasted line\x1b[201~\r")  # a bracketed paste, then Enter
        child.expect(r'"user": "(.*?)", "assistant"')
        assert child.match.group(1) == "first pasted line\\nsecond pasted line"
        child.expect(PROMPT)
        child.send("/sav\r")
        child.expect("unknown command /sav")
        child.expect(PROMPT)
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def test_chat_in_a_terminal_survives_ctrl_c_and_stats_stay_true(make_tiny):
    """Ctrl-C in the middle of a long reply: the reply stops (said so, the partial reply kept), the
    conversation and its cache stay, /stats reports the interrupted reply, and the chat goes on."""
    model = make_tiny(context_length=32768)
    child = spawn_chat(model, "-n", "30000", "--temp", "1", "--min-p", "0", "--seed", "1")
    try:
        child.expect(PROMPT)
        child.send("tell me a long story\r")
        time.sleep(2.0)  # the reply is streaming: tens of thousands of tokens would take minutes
        child.sendintr()  # Ctrl-C
        child.expect(r'"finish_reason": "interrupted"')
        child.expect("reply stopped; the partial reply stays in the conversation")
        child.expect(PROMPT)
        child.send("/stats\r")
        child.expect(r"stopped by Ctrl-C after (\d+) tokens")
        stopped_after = int(child.match.group(1))
        child.expect(r"KV cache \(.*?\): .*? for (\d+) tokens")
        held = int(child.match.group(1))
        assert 1 <= stopped_after and held >= stopped_after  # the cache holds the prompt and the partial reply
        child.expect(PROMPT)
        child.sendintr()  # Ctrl-C at the prompt: the chat stays
        child.expect("Ctrl-D or /exit quits")
        child.expect(PROMPT)
        child.send("\x04")  # Ctrl-D on an empty line ends the chat
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before


def test_chat_session_file_resumes_saves_and_loads(leank_cli, tiny_llama, tmp_path):
    """--session resumes and autosaves; /save and /load move a conversation between files; a greedy reply
    after resuming is the reply the uninterrupted conversation gives."""
    session, other = tmp_path / "chat.session", tmp_path / "other.session"
    args = ("chat", tiny_llama, "-n", "5", "--temp", "0", "--json", "-t", "1")  # one thread: replies compared bit for bit
    whole = leank_cli(*args, stdin="hello\nhow are you\n")
    assert whole.returncode == 0, whole.stderr
    first = leank_cli(*args, "--session", session, stdin="hello\n")
    assert first.returncode == 0, first.stderr and session.is_file()
    resumed = leank_cli(*args, "--session", session, stdin=f"how are you\n/save {other}\n/save {other}\n")
    assert resumed.returncode == 0, resumed.stderr
    expected = [json.loads(line) for line in whole.stdout.splitlines()][1]
    got = json.loads(resumed.stdout.splitlines()[0])
    assert got["assistant"] == expected["assistant"] and got["cache"]["tokens"] == expected["cache"]["tokens"]
    assert other.is_file() and "already exists" in resumed.stderr  # /save never writes over another file
    loaded = leank_cli(*args, stdin=f"/load {other}\n/load {tmp_path / 'missing'}\n/save\n")
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded" in loaded.stderr and "no such session file" in loaded.stderr and "/save needs a file" in loaded.stderr
    # the model file is never a session file, and a session for another policy is refused with one line
    bad = leank_cli(*args, "--session", tiny_llama, stdin="hi\n")
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1
    other_policy = leank_cli(*args, "--kv", "kivi", "--session", session, stdin="hi\n")
    assert other_policy.returncode == 1 and other_policy.stderr.strip().startswith("error:")
