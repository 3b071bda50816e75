"""`gptoss modelfile`: the GGUF header check, the Modelfile's lines, and bad input."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss.errors import ToolchainError
from gptoss.modelfiles import ModelfileError, harmony_template, write
from gptoss.modelfiles import gguf_header
from gptoss.modelfiles.modelfile import DEFAULT_NUM_CTX
from modelfile_support import write_gguf

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def gpt_oss_gguf(tmp_path):
    return write_gguf(tmp_path / "gguf" / "model-q4_k_m.gguf", context_length=4096)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_header_constants_match_gguf_py():
    gguf = pytest.importorskip("gguf")
    assert gguf_header.Keys.ARCHITECTURE == gguf.Keys.General.ARCHITECTURE
    assert gguf_header.Keys.NAME == gguf.Keys.General.NAME
    assert gguf_header.Keys.CONTEXT_LENGTH == gguf.Keys.LLM.CONTEXT_LENGTH
    assert gguf_header.GPT_OSS_ARCH == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT_OSS]
    assert struct.unpack("<I", gguf_header.GGUF_MAGIC)[0] == gguf.GGUF_MAGIC
    assert gguf.GGUF_VERSION in gguf_header.SUPPORTED_VERSIONS


def test_read_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", context_length=2048, name="Tiny ünïcode")
    meta = gguf_header.read_metadata(path)
    assert meta["general.architecture"] == "gpt-oss"
    assert meta["general.name"] == "Tiny ünïcode"
    assert meta["gpt-oss.context_length"] == 2048
    assert gguf_header.architecture(path) == ("gpt-oss", 2048)
    assert gguf_header.architecture(write_gguf(tmp_path / "l.gguf", arch="llama", context_length=None)) == ("llama", None)


def test_modelfile_lines(gpt_oss_gguf):
    out = write(str(gpt_oss_gguf))
    assert out == gpt_oss_gguf.with_name("model-q4_k_m.Modelfile")
    text = out.read_text(encoding="utf-8")
    directives = [line.split(" ", 1)[0] for line in lines(out) if line and line[0].isupper()]
    assert directives == ["FROM", "TEMPLATE", "PARAMETER", "PARAMETER", "PARAMETER"]
    assert "FROM ./model-q4_k_m.gguf" in lines(out)
    assert f'TEMPLATE """{harmony_template()}"""' in text
    params = [line for line in lines(out) if line.startswith("PARAMETER")]
    # num_ctx defaults to 8192, capped at the GGUF's context length (4096 here)
    assert params == ["PARAMETER temperature 1.0", "PARAMETER top_p 1.0", "PARAMETER num_ctx 4096"]
    big = write(str(write_gguf(gpt_oss_gguf.with_name("big.gguf"), context_length=131072)))
    assert f"PARAMETER num_ctx {DEFAULT_NUM_CTX}" in lines(big)
    assert "stop" not in " ".join(params) and "RENDERER" not in text and "PARSER" not in text
    assert "SYSTEM" not in directives


def test_from_is_relative_to_the_modelfile(gpt_oss_gguf, tmp_path):
    out = write(str(gpt_oss_gguf), out=str(tmp_path / "ollama" / "deep" / "Modelfile"), num_ctx=2048)
    from_line = next(line for line in lines(out) if line.startswith("FROM "))
    rel = from_line.split(" ", 1)[1]
    assert rel == "../../gguf/model-q4_k_m.gguf"
    assert (out.parent / rel).resolve() == gpt_oss_gguf.resolve()
    assert "PARAMETER num_ctx 2048" in lines(out)
    # a folder as --out gets <stem>.Modelfile inside it
    folder = tmp_path / "into"
    folder.mkdir()
    assert write(str(gpt_oss_gguf), out=str(folder)) == folder / "model-q4_k_m.Modelfile"


def test_system_prompt_is_written_verbatim(gpt_oss_gguf):
    system = '  Say "hi" first.\n\tThen answer in 日本語.  '
    out = write(str(gpt_oss_gguf), system=system)
    assert f'SYSTEM """{system}"""' in out.read_text(encoding="utf-8")


def test_identical_rewrite_leaves_the_file_alone(gpt_oss_gguf):
    out = write(str(gpt_oss_gguf))
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))
    assert write(str(gpt_oss_gguf)) == out
    assert out.stat().st_mtime_ns == 1_000_000_000
    write(str(gpt_oss_gguf), system="Be brief.")
    assert out.stat().st_mtime_ns != 1_000_000_000
    assert 'SYSTEM """Be brief."""' in out.read_text(encoding="utf-8")


def assert_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_gguf(tmp_path):
    with pytest.raises(ToolchainError) as e:
        write(str(tmp_path / "absent.gguf"))
    assert_error(e, "absent.gguf", "no such file")
    assert list(tmp_path.iterdir()) == []


def test_not_gpt_oss(tmp_path):
    path = write_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ModelfileError) as e:
        write(str(path))
    assert_error(e, "llama.gguf", "general.architecture = 'llama'", "gpt-oss")
    assert not (tmp_path / "llama.Modelfile").exists()


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "not a GGUF"),
        (b"PK\x03\x04 this is a zip", "not a GGUF"),
        (b"GGUF\x03\x00\x00\x00\x01", "truncated"),
        (b"GGUF\x01\x00\x00\x00" + b"\x00" * 16, "version 1 is not supported"),
        (b"GGUF\x03\x00\x00\x00" + struct.pack("<QQ", 0, 1) + struct.pack("<Q", 1 << 40), "corrupt"),
    ],
    ids=["empty", "zip", "truncated", "v1", "corrupt-length"],
)
def test_unreadable_gguf(tmp_path, content, needle):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ToolchainError) as e:
        write(str(path))
    assert_error(e, "bad.gguf", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_truncated_real_gguf(tmp_path):
    full = write_gguf(tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:40])
    with pytest.raises(ToolchainError) as e:
        write(str(cut))
    assert_error(e, "cut.gguf", "truncated")


def test_directory_as_gguf(tmp_path):
    with pytest.raises(ToolchainError) as e:
        write(str(tmp_path))
    assert_error(e, "is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_permissions(gpt_oss_gguf):
    gpt_oss_gguf.chmod(0)
    with pytest.raises(ToolchainError) as e:
        write(str(gpt_oss_gguf))
    assert_error(e, "cannot open")


@pytest.mark.parametrize("token", ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"])
def test_system_with_control_token(gpt_oss_gguf, token):
    with pytest.raises(ModelfileError) as e:
        write(str(gpt_oss_gguf), system=f"Be nice.{token}system")
    assert_error(e, "--system", token)
    assert sorted(p.name for p in gpt_oss_gguf.parent.iterdir()) == [gpt_oss_gguf.name]


@pytest.mark.parametrize(
    "system, needle",
    [('Quote """ here', '"""'), ("zero\u200bwidth", "U+200B"), ("no\u00a0break", "U+00A0")],
    ids=["triple-quote", "zwsp", "nbsp"],
)
def test_system_the_modelfile_parser_would_change(gpt_oss_gguf, system, needle):
    with pytest.raises(ModelfileError) as e:
        write(str(gpt_oss_gguf), system=system)
    assert_error(e, "--system", needle)


def test_bad_num_ctx(gpt_oss_gguf):
    for bad, needle in ((0, "at least"), (-5, "at least"), ("8k", "integer"), (True, "integer"), (8192, "exceeds the GGUF's context length 4096")):
        with pytest.raises(ModelfileError) as e:
            write(str(gpt_oss_gguf), num_ctx=bad)
        assert_error(e, "--num-ctx", needle)


def test_out_cannot_be_the_gguf(gpt_oss_gguf):
    before = gpt_oss_gguf.read_bytes()
    with pytest.raises(ModelfileError) as e:
        write(str(gpt_oss_gguf), out=str(gpt_oss_gguf))
    assert_error(e, "--out", "the GGUF itself")
    assert gpt_oss_gguf.read_bytes() == before


def test_failure_keeps_existing_modelfile(gpt_oss_gguf):
    out = write(str(gpt_oss_gguf), system="first")
    before = out.read_bytes()
    with pytest.raises(ModelfileError):
        write(str(gpt_oss_gguf), system="second <|end|>")
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([gpt_oss_gguf.name, out.name])


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gptoss", "modelfile", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_cli(gpt_oss_gguf, tmp_path):
    out = tmp_path / "cli" / "Modelfile"
    proc = run_cli("--gguf", str(gpt_oss_gguf), "--system", "Be brief.", "--num-ctx", "1024", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert 'SYSTEM """Be brief."""' in out.read_text() and "PARAMETER num_ctx 1024" in lines(out)

    bad = run_cli("--gguf", str(tmp_path / "nope.gguf"))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("gptoss: error: ") and "nope.gguf" in bad.stderr
