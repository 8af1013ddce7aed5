"""The paper's data for users: fetch with sha256 checks, lookup order, what to do when missing."""

import hashlib
import urllib.error

import pytest

from mechunlearn_utils.__main__ import main
from mechunlearn_utils.data import paper
from mechunlearn_utils.data.datasets import DataError, load_athletes

CSV = b"athlete,sport\nMichael Jordan,basketball\nTom Brady,football\n"


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "upstream" / "sports.csv"
    src.parent.mkdir()
    src.write_bytes(CSV)
    return {"sports.csv": (src.as_uri(), hashlib.sha256(CSV).hexdigest())}


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No env var, an empty cache, no CI copy."""
    monkeypatch.delenv(paper.ENV_VAR, raising=False)
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paper, "PAPER_DATA_DIR", tmp_path / "no_ci_copy")


def test_fetch_checks_sha256_and_is_found_in_the_cache(tmp_path, source, nowhere):
    paths = paper.fetch_paper_data(files=source, log=lambda *_: None)
    assert paths == [tmp_path / "cache" / "paper" / "sports.csv"] and paths[0].read_bytes() == CSV
    assert paper.paper_file("sports.csv") == paths[0]
    assert list(load_athletes("paper").athlete) == ["Michael Jordan", "Tom Brady"]
    paper.fetch_paper_data(files=source, log=lambda *_: None)  # already there: kept


def test_a_sha256_mismatch_is_rejected_and_not_saved(tmp_path, source, nowhere):
    url, _ = source["sports.csv"]
    with pytest.raises(paper.PaperDataError, match="sha256"):
        paper.fetch_paper_data(files={"sports.csv": (url, "0" * 64)}, log=lambda *_: None)
    assert not (tmp_path / "cache" / "paper" / "sports.csv").exists()


def test_no_internet_says_so_and_how_to_point_at_a_local_copy(tmp_path, source, nowhere):
    def offline(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    with pytest.raises(paper.PaperDataError) as err:
        paper.fetch_paper_data(files=source, urlopen=offline, log=lambda *_: None)
    assert "no internet" in str(err.value) and "MECHUNLEARN_PAPER_DATA=" in str(err.value)


def test_lookup_order_env_then_cache_then_ci_copy(tmp_path, monkeypatch, nowhere):
    env, cache, ci = tmp_path / "env", tmp_path / "cache" / "paper", tmp_path / "no_ci_copy"
    for folder in (env, cache, ci):
        folder.mkdir(parents=True)
        (folder / "sports.csv").write_bytes(CSV)
    assert paper.paper_file("sports.csv") == cache / "sports.csv"
    monkeypatch.setenv(paper.ENV_VAR, str(env))
    assert paper.paper_file("sports.csv") == env / "sports.csv"
    (env / "sports.csv").unlink()
    (cache / "sports.csv").unlink()
    assert paper.paper_file("sports.csv") == ci / "sports.csv"


def test_missing_paper_data_names_the_command_not_the_ci_copy(nowhere, capsys):
    with pytest.raises(DataError) as err:
        load_athletes("paper")
    message = str(err.value)
    assert paper.FETCH_COMMAND in message and "MECHUNLEARN_PAPER_DATA" in message and "shared" not in message
    assert main(["recall", "--model", "tiny-random", "--facts", "paper"]) == 2
    assert "fetch-paper-data" in capsys.readouterr().err


def test_the_cli_fetches_into_a_folder(tmp_path, monkeypatch, source):
    monkeypatch.setattr(paper, "PAPER_FILES", source)
    assert main(["fetch-paper-data", "--dest", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "sports.csv").read_bytes() == CSV


def test_the_pinned_hashes_match_the_ci_copy():
    for name, (url, sha) in paper.PAPER_FILES.items():
        assert url.startswith("https://") and len(sha) == 64
        if (paper.PAPER_DATA_DIR / name).exists():
            assert paper.sha256_of((paper.PAPER_DATA_DIR / name).read_bytes()) == sha, name
