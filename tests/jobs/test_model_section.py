"""The config tree's model section: the vocabulary follows the dataset unless set."""

from jobs.config import RootConfig


def _model(**model):
    return RootConfig.model_validate({"model": {"preset": "debug", **model}}).model


def test_the_vocabulary_follows_the_dataset_padded_to_a_multiple_of_64():
    assert _model().build().vocab_size == 512  # the preset's, with no dataset to follow
    assert _model().build(1024).vocab_size == 1024
    assert _model().build(1000).vocab_size == 1024
    assert _model().build(300).vocab_size == 320


def test_a_vocabulary_the_user_sets_is_kept():
    assert _model(vocab_size=2048).build(1024).vocab_size == 2048
