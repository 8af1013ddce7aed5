"""The executed workbook as HTML: the index page over a fake results folder."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mechunlearn_utils.workbook import pages  # noqa: E402


def _fake_results(root):
    setup = root / "00_setup"
    setup.mkdir(parents=True)
    (setup / "metrics.json").write_text(json.dumps({
        "athletes.n_known": 124, "facts.n_known": 106, "recall.normal.accuracy": 0.72345,
        "recall.question.accuracy": 0.748, "dtype": "float32", "unrelated": 1}))
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fig.savefig(setup / "recall.png")
    plt.close(fig)
    (setup / "00_setup.html").write_text("<html>executed</html>")
    sweep = root / "02b_depth_sweep"
    sweep.mkdir()
    (sweep / "metrics.json").write_text(json.dumps({"window.0.lr": list(range(20)), "smoke": True}))


def test_index_shows_the_map_figures_links_and_headline_numbers(tmp_path):
    _fake_results(tmp_path)
    text = pages.write_index(tmp_path).read_text()
    for stem in ("00_setup", "01_factual_recall_circuits", "02b_depth_sweep", "07_results"):
        assert f'id="{stem}"' in text  # every notebook of the README's map has a section
    assert "three lenses" in text  # 00's "what you learn", from the README
    assert 'href="00_setup/00_setup.html"' in text and 'src="00_setup/recall.png"' in text
    assert "athletes.n_known" in text and "0.723" in text and "recall.question.accuracy" in text
    assert "unrelated" not in text and "dtype" not in text  # only the headline keys
    assert "[0, 1, 2, 3, 4, 5, 6, 7, ...]" in text and "(SMOKE run)" in text  # long lists are cut
    assert "not run yet" in text.split('id="01_factual_recall_circuits"')[1].split("</section>")[0]


def test_headline_numbers_follow_the_pattern_order_and_cap():
    metrics = {f"window.{i}.forget_normal": i / 10 for i in range(20)} | {"window.0.lr": 1e-4}
    rows = pages.headline_numbers("02b_depth_sweep", metrics)
    assert len(rows) == pages.MAX_HEADLINES and all(k.endswith("forget_normal") for k, _ in rows)
    assert pages.headline_numbers("no_such_notebook", metrics) == []


def test_notebook_map_reads_every_row_of_the_readme():
    learn = pages.notebook_map()
    assert list(learn)[:2] == ["00_setup", "01_factual_recall_circuits"] and "02b_depth_sweep" in learn
    assert "signed sum" in learn["02_localization"]  # a cell with a literal "|" stays whole
