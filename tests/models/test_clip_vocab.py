"""The CLIP tokenizer built from the packaged BPE vocabulary gives the real CLIP token ids."""

from __future__ import annotations

import json

import pytest

from sd_lora.models.clip_vocab import VOCAB_SIZE, clip_tokenizer_dir, find_bpe_file

# Ids of OpenAI's CLIP tokenizer (openai/clip-vit-large-patch14), start 49406 and end 49407 included.
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of a dog": [49406, 320, 1125, 539, 320, 1929, 49407],
    "Hello World": [49406, 3306, 1002, 49407],  # lower-cased
    "the cat, and the dog.": [49406, 518, 2368, 267, 537, 518, 1929, 269, 49407],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("clip-cache")


@pytest.fixture(scope="module")
def tokenizers(cache):
    from transformers import CLIPTokenizer

    return (CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(cache_dir=cache))),
            CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir("!", cache_dir=cache))))


def test_known_clip_token_ids(tokenizers):
    for tokenizer in tokenizers:
        assert len(tokenizer) == VOCAB_SIZE == 49408
        assert tokenizer.model_max_length == 77
        for prompt, ids in KNOWN_IDS.items():
            assert tokenizer(prompt).input_ids == ids, prompt
    # The SD1 tokenizer only: the "!"-padding one treats a bare "!" as its pad token, as transformers does
    # with any special token.
    assert tokenizers[0]("!").input_ids == [49406, 256, 49407]


def test_padding_tokens(tokenizers):
    sd1, sd2 = tokenizers
    assert (sd1.pad_token, sd1.pad_token_id) == ("<|endoftext|>", 49407)
    assert (sd2.pad_token, sd2.pad_token_id) == ("!", 0)  # SD2.x and SDXL's second tokenizer pad with "!" (id 0)
    padded = sd2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [0] * 70


def test_agrees_with_open_clips_own_tokenizer(tokenizers):
    """An independent implementation of the same vocabulary: OpenCLIP's SimpleTokenizer (ftfy, regex, BPE)."""
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    prompts = ["masterpiece, best quality, 1girl, solo, looking at viewer",
               "Ünïcödé café naïve 日本語 emoji 🎉", "zkchar   standing on a beach at sunset; (detailed:1.2)",
               "don't stop-believing #hashtag @user 12345"]
    for prompt in prompts:
        assert tokenizers[0](prompt).input_ids[1:-1] == reference.encode(prompt), prompt


def test_written_once_into_the_cache(cache, monkeypatch):
    folder = clip_tokenizer_dir(cache_dir=cache)
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["cat</w>"] == 2368
    assert (folder / "merges.txt").read_text().splitlines()[:2] == ["#version: 0.2", "i n"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "staging folder left behind"

    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was rebuilt although it is cached")

    monkeypatch.setattr("sd_lora.models.clip_vocab.write_clip_tokenizer_files", fail)
    assert clip_tokenizer_dir(cache_dir=cache) == folder
    assert find_bpe_file().name == "bpe_simple_vocab_16e6.txt.gz"
    with pytest.raises(ValueError, match="pad"):
        clip_tokenizer_dir("<pad>", cache_dir=cache)


def test_a_tokenizer_another_process_finished_first_is_left_in_place(tmp_path, monkeypatch):
    """Two ranks of a multi-GPU run build the tokenizer on first use at once: the one that finished second deleted the
    first one's folder (taking it for an older version's leftover) while that one was copying its files."""
    from sd_lora.models import clip_vocab

    write, cache = clip_vocab.write_clip_tokenizer_files, tmp_path

    def other_process_finishes_meanwhile(directory, **kwargs):
        write(directory, **kwargs)
        write(cache / "clip", **kwargs)  # the other process's folder, renamed into place
        (cache / "clip" / "in-use").write_text("")

    monkeypatch.setattr(clip_vocab, "write_clip_tokenizer_files", other_process_finishes_meanwhile)
    folder = clip_tokenizer_dir(cache_dir=cache)
    assert (folder / "in-use").is_file() and (folder / "vocab.json").is_file()
    assert [p.name for p in cache.iterdir()] == ["clip"]  # this process's copy is gone
