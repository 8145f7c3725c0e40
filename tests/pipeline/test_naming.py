"""The default dataset name comes from the inputs, not from a built-in corpus."""

import pytest

from jobs.config import RootConfig
from jobs.settings import load_config
from pipeline.naming import default_name


@pytest.mark.parametrize(
    "inputs,name",
    [
        (["/home/me/alice.txt"], "alice"),
        (["corpus/alice.jsonl.gz"], "alice"),
        (["s3://bucket/books/"], "books"),
        (["hf://datasets/org/tiny-stories"], "tiny-stories"),
        (["data/*.txt"], "data"),
        (["a/alice.txt", "b/bob.txt", "c/carol.txt"], "alice-and-2-more"),
        (["a/my notes (v2).txt"], "my-notes-v2"),
        (["builtin://python-docs"], "python-docs"),
    ],
)
def test_default_name_is_read_off_the_inputs(inputs, name):
    assert default_name(inputs) == name


def test_a_config_without_a_name_lands_in_a_folder_named_after_its_input(tmp_path):
    cfg = load_config(RootConfig, None, ['data.inputs=["/books/alice.txt"]'])
    assert cfg.data.name == "alice"
    named = load_config(RootConfig, None, ['data.inputs=["/books/alice.txt"]', "data.name=x"])
    assert named.data.name == "x"
