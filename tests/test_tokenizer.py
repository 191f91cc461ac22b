import filecmp
import logging

import pytest

from apl_jax.tokenizer import ASSET_DIR, build_vocab_files, load_tokenizer, open_clip_bpe_path, tokenize


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_known_ids(tokenizer):
    ids = tokenize(tokenizer, ["a photo of a cat"])
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()  # SD 1.x pads with end-of-text


def test_alz_is_one_token(tokenizer):
    assert tokenizer.tokenize("alz") == ["alz</w>"]
    assert tokenize(tokenizer, ["alz"])[0, :3].tolist() == [49406, 41128, 49407]


def test_vocab_size(tokenizer):
    assert len(tokenizer) == 49408


# The ids transformers 4.57's CLIPTokenizer (without ftfy) gave, which this project used before its own
# tokenizer: control characters and U+FFFD dropped, CJK ideographs split apart, NFC, special tokens kept.
# transformers 5's tokenizer gives other ids for the first two.
EARLIER_IDS = {
    "東京の猫": [27667, 365, 21078, 361, 4813, 362, 163, 234, 360],
    "a\x07b\ufffdc\x00d": [596, 4480],
    "Cafe\u0301 ÜBER  na\u00efve\tcat": [15304, 6522, 1516, 1097, 35689, 563, 2368],
    "x<|endoftext|>y": [343, 49407, 344],
    "it's 2026!!": [585, 568, 273, 271, 273, 277, 748],
}


@pytest.mark.parametrize("text", EARLIER_IDS)
def test_same_ids_as_before(tokenizer, text):
    ids = tokenize(tokenizer, [text])[0]
    assert ids[: len(EARLIER_IDS[text]) + 2].tolist() == [49406, *EARLIER_IDS[text], 49407]


def test_transformers_reads_our_folder_and_agrees(tokenizer, tmp_path):
    """transformers' CLIPTokenizer (4.x or 5.x) loads a saved tokenizer folder and gives our ids on ordinary prompts."""
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(tmp_path)
    theirs = CLIPTokenizer.from_pretrained(tmp_path)
    prompts = ["a photo of a cat", "alz A close-up portrait of Mira Castellane, 35mm, f/1.8!", "Café naïve Привет",
               "it's a dog's life\tand\nmore  spaces", "a drawing of " + "a dog " * 80]  # the last is cut
    expected = theirs(prompts, padding="max_length", truncation=True, max_length=77).input_ids
    assert tokenize(tokenizer, prompts).tolist() == expected
    assert theirs.model_max_length == 77 and theirs.pad_token == "<|endoftext|>"


def test_shipped_files_regenerate_identically(tmp_path):
    try:
        bpe = open_clip_bpe_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    build_vocab_files(bpe, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert filecmp.cmp(tmp_path / name, ASSET_DIR / name, shallow=False), name


def test_a_cut_prompt_is_reported_once(tokenizer, caplog):
    long = "a photo of " + "a cat " * 80  # 165 tokens
    fits = "a photo of " + "a cat " * 36  # 77 exactly: no warning
    with caplog.at_level(logging.WARNING, logger="apl_jax"):
        for _ in range(2):
            ids = tokenize(tokenizer, [long, fits, "alz " + fits], extra_tokens=[0, 0, 9])
    assert ids[0, -1] == ids[1, -1] == 49407  # cut, end-of-text kept
    assert [r.getMessage() for r in caplog.records] == [
        f"prompt cut at 77 tokens (it has 165); the text encoder never sees the rest: {long!r}",
        f"prompt cut at 77 tokens (it has 87 with the prefix's 9 extra tokens); the text encoder never sees the rest: "
        f"{'alz ' + fits!r}",
    ]
