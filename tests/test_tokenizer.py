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
