from __future__ import annotations

import random

import pytest

from sd_lora.errors import UserError
from sd_lora.sampling.prompts import (
    SamplePrompt,
    default_prompts,
    parse_prompt_line,
    read_prompt_file,
    validate_size,
)

WHERE = "prompts.txt:3"
FULL = SamplePrompt(
    prompt="a photo of zkchar, smiling",
    negative="blurry, low quality",
    width=512,
    height=768,
    steps=28,
    cfg=7.5,
    seed=42,
)


@pytest.mark.parametrize(
    "line",
    [
        "a photo of zkchar, smiling --n blurry, low quality --w 512 --h 768 --s 28 --l 7.5 --d 42",
        "a photo of zkchar, smiling --d 42 --l 7.5 --s 28 --h 768 --w 512 --n blurry, low quality",
        "a photo of zkchar, smiling --w 512 --n blurry, low quality --d 42 --h 768 --l 7.5 --s 28",
        "  a photo of zkchar, smiling   --W 512 --H 768  --n  blurry, low quality   --S 28 --L 7.5 --D 42  ",
    ],
)
def test_options_in_any_order(line):
    assert parse_prompt_line(line, WHERE) == FULL


def test_prompt_without_options_uses_defaults():
    assert parse_prompt_line("a red circle", WHERE) == SamplePrompt("a red circle")


def test_double_dash_not_followed_by_a_letter_is_text():
    p = parse_prompt_line("a x--y  b -- c --n bad -- hands, --2 blurry", WHERE)
    assert p.prompt == "a x--y  b -- c"
    assert p.negative == "bad -- hands, --2 blurry"


def test_ss_picks_the_rows_sampler_by_kohyas_names():
    """kohya's per-prompt sampler (--ss), its k_ spellings and any case; prompt files written for kohya work."""
    assert parse_prompt_line("a cat --ss euler_a --s 3", WHERE).sampler == "euler_a"
    assert parse_prompt_line("a cat --ss K_DPM_2_A", WHERE).sampler == "k_dpm_2_a"
    assert parse_prompt_line("a cat", WHERE).sampler is None


def test_cfg_accepts_integers_and_exponents():
    assert parse_prompt_line("a --l 7", WHERE).cfg == 7.0
    assert parse_prompt_line("a --l 0", WHERE).cfg == 0.0
    assert parse_prompt_line("a --l 1e1", WHERE).cfg == 10.0
    assert parse_prompt_line("a --l 100", WHERE).cfg == 100.0


def test_the_largest_size_is_the_largest_resolution():
    prompt = parse_prompt_line("a --w 4096 --h 4096", WHERE)
    assert (prompt.width, prompt.height) == (4096, 4096)


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("a cat --q 3", "unknown option --q"),
        ("a cat --ss lms", "--ss 'lms' is not valid; expected sampler, one of ddim, euler, euler_a, dpmsolver++"),
        ("a cat --w512", "write --w 512"),
        ("a cat --w 0", "--w '0'"),
        ("a cat --w -64", "--w '-64'"),
        ("a cat --w 51.2", "--w '51.2'"),
        ("a cat --w 1_000", "--w '1_000'"),
        ("a cat --w 40960", "--w '40960' is not valid; expected width in pixels, an integer from 1 to 4096"),  # as --resolution
        ("a cat --h 8192", "--h '8192'"),
        ("a cat --h abc", "--h 'abc'"),
        ("a cat --s 0", "--s '0'"),
        ("a cat --s 1001", "--s '1001'"),
        ("a cat --s 2.5", "--s '2.5'"),
        ("a cat --s", "--s has no value"),
        ("a cat --l -1", "--l '-1'"),
        ("a cat --l high", "--l 'high'"),
        ("a cat --l nan", "--l 'nan'"),
        ("a cat --l inf", "--l 'inf'"),
        ("a cat --l 1e3", "--l '1e3' is not valid; expected CFG scale, a number from 0 to 100"),  # as --sample-cfg
        ("a cat --d -1", "--d '-1'"),
        ("a cat --d 1.5", "--d '1.5'"),
        ("a cat --d 9223372036854775808", "--d '9223372036854775808'"),
        ("a cat --w 64 --w 128", "--w is given twice"),
        ("--n blurry --w 64", "prompt text"),
        ("   ", "prompt text"),
    ],
)
def test_bad_lines_name_the_place_and_the_value(line, fragment):
    with pytest.raises(UserError) as e:
        parse_prompt_line(line, WHERE)
    message = str(e.value)
    assert message.startswith(WHERE + ":")
    assert fragment in message


def test_bad_values_say_what_is_expected():
    with pytest.raises(UserError, match=r"expected sampling steps, an integer from 1 to 1000"):
        parse_prompt_line("a --s 0", WHERE)
    with pytest.raises(UserError) as e:
        parse_prompt_line("a --q 1", WHERE)
    for option in ("--n", "--w", "--h", "--s", "--l", "--d"):
        assert option in str(e.value)  # the supported options are listed


@pytest.mark.parametrize("option, instead", [("g", "use --l"), ("cn", "ControlNet"),
                                             ("ctr", "CFG truncation"), ("rcfg", "renormalisation"), ("fs", "flow shift")])
def test_kohyas_other_options_say_what_to_do_instead(option, instead):
    """kohya's sample prompts also take --g, --cn, ... (train_util.line_to_prompt_dict): a prompt file
    written for kohya gets told what each means here, not a wrong "missing space? write --s s" guess."""
    with pytest.raises(UserError) as e:
        parse_prompt_line(f"a cat --{option} 3 --w 64", WHERE)
    message = str(e.value)
    assert message.startswith(f"{WHERE}: --{option} is kohya's ") and instead in message
    assert "remove it" in message and "missing space" not in message and "unknown option" not in message


def test_all_problems_on_a_line_are_reported_together():
    with pytest.raises(UserError) as e:
        parse_prompt_line("a --q 1 --w 0 --l x", WHERE)
    message = str(e.value)
    assert "3 problems" in message
    assert "--q" in message and "--w '0'" in message and "--l 'x'" in message


def test_validate_size():
    validate_size(SamplePrompt("a", width=512, height=768), 8, WHERE)
    validate_size(SamplePrompt("a"), 8, WHERE)  # no own size: nothing to check
    with pytest.raises(UserError) as e:
        validate_size(SamplePrompt("a", width=500, height=768), 8, WHERE)
    message = str(e.value)
    assert message.startswith(WHERE) and "--w 500" in message and "496 or 504" in message
    assert "--h" not in message
    with pytest.raises(UserError, match="--h 30"):
        validate_size(SamplePrompt("a", height=30), 4, WHERE)


def test_read_prompt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(
        "\ufeff# sample prompts\r\n\r\na red circle --d 3\r\n   \n  # indented comment\nzkchar café --w 64\n".encode()
    )
    assert read_prompt_file(path) == [
        SamplePrompt("a red circle", seed=3),
        SamplePrompt("zkchar café", width=64),
    ]


def test_read_prompt_file_reports_every_bad_line_with_its_number(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\na good one\n\na cat --q 1\nfine --w 64\nbad --s 0\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_prompt_file(path)
    message = str(e.value)
    assert f"{path}:4: unknown option --q" in message
    assert f"{path}:6: --s '0'" in message
    assert f"{path}:2" not in message and f"{path}:5" not in message


def test_read_prompt_file_checks_sizes_and_names_the_line(tmp_path):
    """A --w/--h the pipeline would refuse is reported with its file and line (not the prompt's index among
    the prompts, which differs from the line once there are comments), beside the other bad lines."""
    path = tmp_path / "prompts.txt"
    path.write_text("# sizes\n\na good one --w 512 --h 768\nodd --w 500\nbad --q 1\ntall --h 30\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_prompt_file(path)
    message = str(e.value)
    assert f"{path}:4: --w 500 is not a multiple of 8" in message and "use 496 or 504" in message
    assert f"{path}:5: unknown option --q" in message
    assert f"{path}:6: --h 30 is not a multiple of 8" in message and "use 24 or 32" in message
    assert f"{path}:3" not in message
    path.write_text("odd --w 500\n", encoding="utf-8")
    assert read_prompt_file(path, size_step=4) == [SamplePrompt("odd", width=500)]


@pytest.mark.parametrize("content", ["", "\n\n   \n", "# only\n# comments\n"])
def test_file_without_prompts_is_an_error(tmp_path, content):
    path = tmp_path / "prompts.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="no prompts found") as e:
        read_prompt_file(path)
    assert str(path) in str(e.value)


def test_missing_folder_and_undecodable_files(tmp_path):
    with pytest.raises(UserError, match="prompt file not found") as e:
        read_prompt_file(tmp_path / "nope.txt")
    assert "nope.txt" in str(e.value)
    with pytest.raises(UserError, match="is a folder"):
        read_prompt_file(tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a caf\u00e9 photo\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"not UTF-8 .*0xe9.*offset 5.*Re-save") as e:
        read_prompt_file(latin1)
    assert "latin1.txt" in str(e.value)
    latin1.write_bytes(b"\xef\xbb\xbf" + "a caf\u00e9 photo\n".encode("latin-1"))  # offsets count the BOM
    with pytest.raises(UserError, match=r"0xe9 at offset 8"):
        read_prompt_file(latin1)
    # UTF-16 without a byte-order mark decoded as UTF-8: three rows of garbled prompts, their --s option lost.
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("a cat --s 2\nred circle\n".encode("utf-16-le"))
    with pytest.raises(UserError, match=r"utf16.txt: holds NUL bytes \(byte 1\): UTF-16 text without a byte-order mark"):
        read_prompt_file(utf16)
    utf16.write_bytes("a cat\n".encode("utf-16"))  # with its mark (Notepad's "Unicode")
    with pytest.raises(UserError, match=r"utf16.txt: UTF-16 text \(it starts with a UTF-16 byte-order mark\). Re-save the file as UTF-8"):
        read_prompt_file(utf16)
    toml = tmp_path / "prompts.toml"
    toml.write_text("[[prompt]]\n", encoding="utf-8")
    with pytest.raises(UserError, match="plain-text") as e:
        read_prompt_file(toml)
    assert "--ss" in str(e.value)  # every option a line may use, the sampler too


CAPTIONS = [f"caption {i:02d}" for i in range(10)]


def test_default_prompts_are_distinct_evenly_spaced_and_deterministic():
    noisy = CAPTIONS + ["caption 03", " caption 05 ", "", "   "]
    prompts = default_prompts(noisy, n=4)
    # sorted unique list of 10, indices i * 10 // 4 = 0, 2, 5, 7
    assert [p.prompt for p in prompts] == ["caption 00", "caption 02", "caption 05", "caption 07"]
    shuffled = noisy[:]
    random.Random(0).shuffle(shuffled)
    assert default_prompts(shuffled, n=4) == prompts
    assert all(p == SamplePrompt(p.prompt) for p in prompts)  # no options parsed from captions


def test_default_prompts_with_few_captions():
    assert [p.prompt for p in default_prompts(["b", "a", "b", ""], n=4)] == ["a", "b"]
    assert default_prompts(CAPTIONS, n=0) == []
    assert default_prompts([], n=0) == []


@pytest.mark.parametrize("captions", [[], ["", "  ", "\t"]])
def test_default_prompts_without_captions_are_the_empty_prompt(captions):
    """Uncaptioned images in a `5_` folder train on empty captions: the grid samples the empty prompt (the
    unconditional image, what such a LoRA changes) instead of having no rows and stopping the run."""
    assert default_prompts(captions, n=4) == [SamplePrompt("")]
    assert len(default_prompts(CAPTIONS, n=10)) == 10
    assert default_prompts(["x --w 64"], n=1) == [SamplePrompt("x --w 64")]


@pytest.mark.parametrize(("line", "fix"), [("a cat --w=512", "write --w 512, with a space"),
                                          ("a cat --ss=euler --d 1", "write --ss euler, with a space"),
                                          ("a cat --s=", "write --s <value>, with a space")])
def test_an_option_written_with_equals_is_told_to_use_a_space(line, fix):
    with pytest.raises(UserError) as err:
        parse_prompt_line(line, "p.txt:1")
    assert fix in str(err.value) and "missing space" not in str(err.value)


def test_read_prompt_file_splits_lines_where_an_editor_does(tmp_path):
    # A U+2028 or form feed pasted into a prompt is not a line break: still one prompt, later lines keep their number
    path = tmp_path / "p.txt"
    path.write_bytes("a photo of\u2028a cat --d 1\r\nold\x0cmac\rbad --w 7\n".encode())
    with pytest.raises(UserError) as err:
        read_prompt_file(path)
    assert str(err.value).startswith(f"{path}:3: --w 7 is not a multiple of 8")
    path.write_bytes("a photo of\u2028a cat --d 1\r\nold\x0cmac\rlast\n".encode())
    assert [p.prompt for p in read_prompt_file(path)] == ["a photo of\u2028a cat", "old\x0cmac", "last"]
